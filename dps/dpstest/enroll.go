package dpstest

import (
	"crypto/hmac"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"hash/fnv"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/sas"
)

// Allocation chooses a hub among an enrollment's linked hubs.
type Allocation int

const (
	// Hashed spreads devices evenly by a hash of the registration ID (Azure's "evenly
	// weighted distribution"); a device lands on the same hub every time while the list is
	// unchanged.
	Hashed Allocation = iota
	// Static always assigns the first linked hub.
	Static
)

// Reprovision is what happens when an already assigned device registers again (DOC-REPROV).
type Reprovision int

const (
	// Migrate re-allocates and moves the twin along: substatus deviceDataMigrated.
	Migrate Reprovision = iota
	// Reset re-allocates and resets the twin to the enrollment's: substatus deviceDataReset.
	Reset
	// Never keeps the device on the hub it has.
	Never
)

// Substatus values of an assigned registration.
const (
	InitialAssignment                = "initialAssignment"
	DeviceDataMigrated               = "deviceDataMigrated"
	DeviceDataReset                  = "deviceDataReset"
	ReprovisionedToInitialAssignment = "reprovisionedToInitialAssignment"
)

// Policy is what an enrollment of either kind decides about its devices.
type Policy struct {
	Disabled bool
	// Hubs are the linked hubs; empty means the instance's Config.Hubs.
	Hubs       []string
	Allocation Allocation
	// Allocate, when set, replaces Allocation (Azure's custom allocation webhook): an error
	// fails the registration with errorCode 400207.
	Allocate    AllocateFunc
	InitialTwin json.RawMessage
	Reprovision Reprovision
	// Credential, when set, has DPS sign the CSRs of registrations (credentials.go).
	Credential *CredentialPolicy
}

// AllocationRequest is what a custom allocation function is told: Azure's AllocationRequest
// (learn.microsoft.com/azure/iot-dps/concepts-custom-allocation).
type AllocationRequest struct {
	RegistrationID string
	EnrollmentID   string
	// Individual says EnrollmentID is an individual enrollment, not a group.
	Individual bool
	// Attestation is "x509" or "symmetricKey".
	Attestation string
	// DeviceID is the device ID the enrollment gives the device.
	DeviceID string
	// Payload is the device's custom payload; nil when it sent none or null.
	Payload    json.RawMessage
	LinkedHubs []string
	// CurrentHub and CurrentDeviceID are those of an earlier assignment, "" for a new device.
	CurrentHub, CurrentDeviceID string
}

// AllocationResult is what a custom allocation function decides. Hub must be one of the
// linked hubs.
type AllocationResult struct {
	Hub string
	// Payload is returned to the device in registrationState.payload.
	Payload json.RawMessage
	// InitialTwin, when set, replaces the enrollment's.
	InitialTwin json.RawMessage
}

// AllocateFunc is a custom allocation policy.
type AllocateFunc func(AllocationRequest) (AllocationResult, error)

// Group is an enrollment group: devices whose certificate chains to CA, or that sign their
// SAS token with a key derived from SymmetricKey. Exactly one of the two is set.
type Group struct {
	ID           string
	CA           *x509.Certificate
	SymmetricKey []byte
	Policy
}

// Individual is an individual enrollment for one registration ID: an X.509 device matched by
// the thumbprint of its certificate, or a symmetric-key device. Exactly one of Thumbprint
// and SymmetricKey is set.
type Individual struct {
	RegistrationID string
	// Thumbprint is the SHA-256 (or SHA-1) of the device certificate, hex, any case.
	Thumbprint   string
	SymmetricKey []byte
	// EndorsementKey enrolls a TPM (TPM attestation, over HTTPS only): its EK's marshalled
	// TPM2B_PUBLIC, as the portal takes it in base64.
	EndorsementKey []byte
	// DeviceID is the hub device ID; empty means the registration ID.
	DeviceID string
	Policy
}

// AddGroup enrolls a group, replacing one with the same ID.
func (s *Server) AddGroup(g Group) error {
	if g.ID == "" || (g.CA == nil) == (g.SymmetricKey == nil) {
		return fmt.Errorf("cannot enroll group %q: need an ID and exactly one of CA and SymmetricKey", g.ID)
	}
	if g.CA != nil && !g.CA.IsCA {
		return fmt.Errorf("cannot enroll group %q: %q is not a CA certificate", g.ID, g.CA.Subject.CommonName)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.groups = slices.DeleteFunc(s.groups, func(old *Group) bool { return old.ID == g.ID })
	s.groups = append(s.groups, &g)
	return nil
}

// AddIndividual enrolls one device, replacing an enrollment with the same registration ID.
func (s *Server) AddIndividual(e Individual) error {
	given := 0
	for _, set := range []bool{e.Thumbprint != "", e.SymmetricKey != nil, e.EndorsementKey != nil} {
		if set {
			given++
		}
	}
	if e.RegistrationID == "" || given != 1 {
		return fmt.Errorf("cannot enroll %q: need a registration ID and exactly one of Thumbprint, SymmetricKey and EndorsementKey", e.RegistrationID)
	}
	if e.EndorsementKey != nil {
		if _, err := parseTPMKey(e.EndorsementKey, "endorsement key"); err != nil {
			return fmt.Errorf("cannot enroll %q: %w", e.RegistrationID, err)
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.individuals[strings.ToLower(e.RegistrationID)] = &e
	return nil
}

// SetEnabled enables or disables the individual enrollment with this registration ID, or
// else the group with this ID.
func (s *Server) SetEnabled(id string, enabled bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.policyLocked(id)
	if p == nil {
		return fmt.Errorf("enrollment %q: %w", id, ErrNotFound)
	}
	p.Disabled = !enabled
	return nil
}

// RemoveEnrollment deletes the individual enrollment with this registration ID, or else the
// group with this ID. Registrations already made stay.
func (s *Server) RemoveEnrollment(id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.individuals[strings.ToLower(id)]; ok {
		delete(s.individuals, strings.ToLower(id))
		return nil
	}
	n := len(s.groups)
	s.groups = slices.DeleteFunc(s.groups, func(g *Group) bool { return g.ID == id })
	if len(s.groups) == n {
		return fmt.Errorf("enrollment %q: %w", id, ErrNotFound)
	}
	return nil
}

func (s *Server) policyLocked(id string) *Policy {
	if e, ok := s.individuals[strings.ToLower(id)]; ok {
		return &e.Policy
	}
	for _, g := range s.groups {
		if g.ID == id {
			return &g.Policy
		}
	}
	return nil
}

// enrollment is the enrollment a connection authenticated against, resolved again (by ID)
// for each request so that disabling or removing it takes effect at once.
type enrollment struct {
	id         string
	individual bool
	// auth is how the hub should authenticate the device.
	auth DeviceAuth
	// leaf is the device's certificate (X.509 only), whose CN must equal the registration ID.
	leaf *x509.Certificate
}

// authenticate finds the enrollment that admits the connecting device: an individual
// enrollment first, then groups from the CA nearest the leaf upwards (DOC-X509). It returns
// a reason when none does.
func (s *Server) authenticate(regID string, password []byte, peer []*x509.Certificate) (*enrollment, string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.cfg.Now()
	if password != nil {
		return s.authSASLocked(regID, string(password), now)
	}
	if len(peer) == 0 {
		return nil, "no client certificate and no SAS token"
	}
	leaf := peer[0]
	if e, ok := s.individuals[strings.ToLower(regID)]; ok && e.Thumbprint != "" && thumbprintMatches(e.Thumbprint, leaf) {
		if now.Before(leaf.NotBefore) || now.After(leaf.NotAfter) {
			return nil, "certificate is outside its validity period"
		}
		return &enrollment{id: e.RegistrationID, individual: true, leaf: leaf,
			auth: DeviceAuth{Thumbprint: certcodec.Thumbprint(leaf)}}, ""
	}
	inters := x509.NewCertPool()
	for _, c := range peer[1:] {
		inters.AddCert(c)
	}
	var best *Group
	bestDepth := 0
	for _, g := range s.groups {
		if g.CA == nil {
			continue
		}
		roots := x509.NewCertPool()
		roots.AddCert(g.CA)
		chains, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inters, CurrentTime: now,
			KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
		if err != nil {
			continue
		}
		depth := len(chains[0])
		for _, ch := range chains[1:] {
			depth = min(depth, len(ch))
		}
		if best == nil || depth < bestDepth {
			best, bestDepth = g, depth
		}
	}
	if best == nil {
		return nil, "certificate matches no enrollment"
	}
	return &enrollment{id: best.ID, leaf: leaf,
		auth: DeviceAuth{Thumbprint: certcodec.Thumbprint(leaf), CA: best.CA}}, ""
}

func thumbprintMatches(want string, c *x509.Certificate) bool {
	want = strings.ReplaceAll(want, ":", "")
	s256 := sha256.Sum256(c.Raw)
	s1 := sha1.Sum(c.Raw)
	return strings.EqualFold(want, fmt.Sprintf("%x", s256[:])) || strings.EqualFold(want, fmt.Sprintf("%x", s1[:]))
}

// authSASLocked checks a SAS token (protocol.md §1.2): the resource must be this instance's
// registration, the expiry in the future, and the signature made with the individual key or
// a key derived from a group's.
func (s *Server) authSASLocked(regID, token string, now time.Time) (*enrollment, string) {
	rest, ok := strings.CutPrefix(token, "SharedAccessSignature ")
	if !ok {
		return nil, "password is not a SharedAccessSignature"
	}
	fields := map[string]string{}
	for _, kv := range strings.Split(rest, "&") {
		k, v, _ := strings.Cut(kv, "=")
		fields[k] = v
	}
	rawSR, rawSig, rawSE := fields["sr"], fields["sig"], fields["se"]
	sr, err1 := url.QueryUnescape(rawSR)
	sigText, err2 := url.QueryUnescape(rawSig)
	sig, err3 := base64.StdEncoding.DecodeString(sigText)
	se, err4 := strconv.ParseInt(rawSE, 10, 64)
	if err1 != nil || err2 != nil || err3 != nil || err4 != nil {
		return nil, "malformed SAS token"
	}
	if !strings.EqualFold(sr, s.cfg.IDScope+"/registrations/"+regID) {
		return nil, fmt.Sprintf("SAS token is for %q, not this registration", sr)
	}
	if now.Unix() >= se {
		return nil, "SAS token has expired"
	}
	// The signature covers the resource as the device encoded it (ESDK-C writes %2f, others %2F).
	toSign := []byte(rawSR + "\n" + rawSE)
	valid := func(key []byte) bool {
		m := hmac.New(sha256.New, key)
		m.Write(toSign)
		return hmac.Equal(m.Sum(nil), sig)
	}
	if e, ok := s.individuals[strings.ToLower(regID)]; ok {
		key := e.SymmetricKey
		if e.EndorsementKey != nil {
			key = s.tpmKeys[strings.ToLower(regID)] // the identity key of its latest challenge
		}
		if key != nil && valid(key) {
			return &enrollment{id: e.RegistrationID, individual: true, auth: DeviceAuth{SymmetricKey: key}}, ""
		}
	}
	for _, g := range s.groups {
		if g.SymmetricKey == nil {
			continue
		}
		if key := sas.DeviceKey(g.SymmetricKey, regID); valid(key) {
			return &enrollment{id: g.ID, auth: DeviceAuth{SymmetricKey: key}}, ""
		}
	}
	return nil, "SAS signature matches no enrollment"
}

// lookupLocked returns the current policy of the enrollment e names and the device ID it
// gives regID, or nil when the enrollment has been removed.
func (s *Server) lookupLocked(e *enrollment, regID string) (*Policy, string) {
	if e.individual {
		ind, ok := s.individuals[strings.ToLower(e.id)]
		if !ok {
			return nil, ""
		}
		if ind.DeviceID != "" {
			return &ind.Policy, ind.DeviceID
		}
		return &ind.Policy, regID
	}
	for _, g := range s.groups {
		if g.ID == e.id {
			return &g.Policy, regID
		}
	}
	return nil, ""
}

// allocate picks a hub by the policy's rule.
func allocate(p *Policy, hubs []string, regID string) string {
	if p.Allocation == Static {
		return hubs[0]
	}
	h := fnv.New32a()
	h.Write([]byte(strings.ToLower(regID)))
	return hubs[h.Sum32()%uint32(len(hubs))]
}
