package dpstest

import (
	"bytes"
	"encoding/json"
	"strings"
)

// challengeTPM answers the unauthenticated register request of a TPM-enrolled device as DPS
// does (certificates.md §4): with a challenge for the EK and SRK it sent when the EK is the
// enrollment's, refused otherwise. The challenge's identity key then checks the device's SAS
// tokens, until the next challenge. ok is false when regID has no TPM enrollment.
func (s *Server) challengeTPM(regID string, body []byte) (r reply, ok bool) {
	s.mu.Lock()
	e, enrolled := s.individuals[strings.ToLower(regID)]
	s.mu.Unlock()
	if !enrolled || e.EndorsementKey == nil {
		return reply{}, false
	}
	st := &connState{regID: regID, sas: true}
	var req struct {
		TPM *struct {
			EndorsementKey []byte `json:"endorsementKey"`
			StorageRootKey []byte `json:"storageRootKey"`
		} `json:"tpm"`
	}
	if err := json.Unmarshal(body, &req); err != nil || req.TPM == nil {
		return s.refuse(st, "TPM enrollment: the request carries no endorsement and storage root keys"), true
	}
	if !bytes.Equal(req.TPM.EndorsementKey, e.EndorsementKey) {
		return s.refuse(st, "the endorsement key is not the enrollment's"), true
	}
	ch, err := NewTPMChallenge(req.TPM.EndorsementKey, req.TPM.StorageRootKey)
	if err != nil {
		r := s.errorReply(400, 400004, "The TPM keys are not valid.", noRetryAfter)
		r.reason = err.Error()
		return r, true
	}
	s.mu.Lock()
	s.tpmKeys[strings.ToLower(regID)] = ch.IdentityKey
	s.mu.Unlock()
	b, _ := json.Marshal(struct {
		AuthenticationKey []byte `json:"authenticationKey"`
	}{ch.AuthenticationKey})
	return reply{status: 401, body: b, retryAfter: noRetryAfter}, true
}
