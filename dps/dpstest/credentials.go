package dpstest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/unicity-iot/unicity/internal/pki"
)

// Certificate issuance (certificates.md §1–2): an enrollment linked to a credential policy
// has DPS sign the CSR a device registers with; without one DPS assigns the device and
// returns no chain. IssueCertificate is the same policy seen from IoT Hub, for renewals.

// KeyType is a CSR key type a credential policy signs.
type KeyType string

// The key types the service signs. RSA is not one (concept-certificate-issuance).
const (
	KeyP256 KeyType = "P-256"
	KeyP384 KeyType = "P-384"
)

// DefaultValidity is the lifetime of issued certificates under a policy that sets none.
const DefaultValidity = 30 * 24 * time.Hour

// CredentialPolicy is an Azure Device Registry policy linked to an enrollment
// (credentialPolicyName).
type CredentialPolicy struct {
	Name string
	// Validity is the issued certificates' lifetime, counted from issuance; zero means
	// DefaultValidity. Azure allows days (7 to 90); the emulator takes any positive
	// duration, so that tests can renew many times.
	Validity time.Duration
	// KeyTypes are the CSR keys the policy signs; empty means P-256 and P-384.
	KeyTypes []KeyType
}

// Errors of issuance, for the hub to answer with.
var (
	// ErrCSRRejected: the policy does not sign this CSR (key type, CN, signature).
	ErrCSRRejected = errors.New("certificate request rejected")
	// ErrNoCredentialPolicy: the device's enrollment has no credential policy.
	ErrNoCredentialPolicy = errors.New("no credential policy")
)

// Connection profiles DPS returns from api-version 2026-11-02-preview on (certificates.md §1).
const (
	ProfileClassic = "classic"
	ProfileMQTTv5  = "mqttV5"
)

// profileAPIVersion is the first api-version whose assignments carry connectionProfile.
const profileAPIVersion = "2026-11-02-preview"

// SetCredentialPolicy links p to the individual enrollment with this registration ID, or
// else to the group with this ID; nil unlinks it.
func (s *Server) SetCredentialPolicy(id string, p *CredentialPolicy) error {
	if p != nil {
		if p.Validity < 0 {
			return fmt.Errorf("credential policy %q: validity %v is negative", p.Name, p.Validity)
		}
		for _, k := range p.KeyTypes {
			if k != KeyP256 && k != KeyP384 {
				return fmt.Errorf("credential policy %q: key type %q is not %s or %s", p.Name, k, KeyP256, KeyP384)
			}
		}
		c := *p
		c.KeyTypes = slices.Clone(p.KeyTypes)
		p = &c
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	pol := s.policyLocked(id)
	if pol == nil {
		return fmt.Errorf("enrollment %q: %w", id, ErrNotFound)
	}
	pol.Credential = p
	return nil
}

// SetConnectionProfile makes DPS announce profile (ProfileClassic, the default, ProfileMQTTv5
// or anything else, for clients' error paths) for assignments to hub.
func (s *Server) SetConnectionProfile(hub, profile string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.profiles == nil {
		s.profiles = map[string]string{}
	}
	s.profiles[hub] = profile
}

// connectionProfile is what an assignment to hub says, at the api-version the device speaks.
func (s *Server) connectionProfile(hub, apiVersion string) string {
	if apiVersion < profileAPIVersion {
		return ""
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if p, ok := s.profiles[hub]; ok {
		return p
	}
	return ProfileClassic
}

// credentialOf is the policy of the enrollment e names, nil when it has none.
func (s *Server) credentialOf(e *enrollment, regID string) *CredentialPolicy {
	s.mu.Lock()
	defer s.mu.Unlock()
	p, _ := s.lookupLocked(e, regID)
	if p == nil {
		return nil
	}
	return p.Credential
}

// check reports why p does not sign csr, wrapping ErrCSRRejected. A nil policy signs nothing
// and rejects nothing.
func (p *CredentialPolicy) check(csr *x509.CertificateRequest) error {
	if p == nil {
		return nil
	}
	var key KeyType
	if k, ok := csr.PublicKey.(*ecdsa.PublicKey); ok {
		switch k.Curve {
		case elliptic.P256():
			key = KeyP256
		case elliptic.P384():
			key = KeyP384
		}
	}
	allowed := p.KeyTypes
	if len(allowed) == 0 {
		allowed = []KeyType{KeyP256, KeyP384}
	}
	if key == "" || !slices.Contains(allowed, key) {
		return fmt.Errorf("%w: credential policy %q signs %s keys, not %s", ErrCSRRejected, p.Name, joinKeyTypes(allowed), describeKey(csr))
	}
	return nil
}

func joinKeyTypes(ks []KeyType) string {
	s := make([]string, len(ks))
	for i, k := range ks {
		s[i] = "EC " + string(k)
	}
	return strings.Join(s, " and ")
}

func describeKey(csr *x509.CertificateRequest) string {
	switch k := csr.PublicKey.(type) {
	case *ecdsa.PublicKey:
		return "EC " + k.Curve.Params().Name
	}
	return csr.PublicKeyAlgorithm.String()
}

// issue signs csr under p and returns the chain DPS returns: leaf first, up to the root.
func (s *Server) issue(p *CredentialPolicy, csr *x509.CertificateRequest) ([]*x509.Certificate, error) {
	if err := p.check(csr); err != nil {
		return nil, err
	}
	validity := p.Validity
	if validity == 0 {
		validity = DefaultValidity
	}
	nb := s.cfg.Now().UTC().Truncate(time.Second)
	na := nb.Add(validity)
	if ca := s.issuingCA.Certificate.NotAfter; na.After(ca) {
		na = ca // no certificate outlives its issuer
	}
	leaf, err := s.issuingCA.SignCSR(csr, pki.WithValidity(nb, na))
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCSRRejected, err)
	}
	return append(leaf.Chain, s.issuingCA.Root()), nil
}

// IssueCertificate signs csr for the device DPS assigned as deviceID, under its enrollment's
// credential policy: what IoT Hub asks Azure Device Registry for when a device renews
// through the hub (hubtest's issueCertificate). The CSR's CN must be the device's
// registration ID, as for DPS. The chain is leaf first, up to the root. Errors match
// ErrNotFound (DPS assigned no such device), ErrNoCredentialPolicy or ErrCSRRejected.
func (s *Server) IssueCertificate(deviceID string, csr *x509.CertificateRequest) ([]*x509.Certificate, error) {
	s.mu.Lock()
	var rec *record
	for _, r := range s.records {
		if r.DeviceID == deviceID && r.Status == "assigned" {
			rec = r
			break
		}
	}
	var credential *CredentialPolicy
	if rec != nil {
		if p := s.policyLocked(rec.EnrollmentID); p != nil {
			credential = p.Credential
		}
	}
	s.mu.Unlock()
	switch {
	case rec == nil:
		return nil, fmt.Errorf("device %q: %w", deviceID, ErrNotFound)
	case credential == nil:
		return nil, fmt.Errorf("enrollment %q of device %q: %w", rec.EnrollmentID, deviceID, ErrNoCredentialPolicy)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("%w: csr signature is invalid: %w", ErrCSRRejected, err)
	}
	if csr.Subject.CommonName != rec.RegistrationID {
		return nil, fmt.Errorf("%w: csr CN %q is not registration ID %q", ErrCSRRejected, csr.Subject.CommonName, rec.RegistrationID)
	}
	return s.issue(credential, csr)
}
