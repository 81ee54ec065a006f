package main

import (
	"context"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/config"
	"github.com/unicity-iot/unicity/device"
	"github.com/unicity-iot/unicity/storage"
)

// identityReport is `unicity identity --json`.
type identityReport struct {
	RegistrationID   string    `json:"registration_id"`
	Subject          string    `json:"subject"`
	Issuer           string    `json:"issuer"`
	Serial           string    `json:"serial"`
	SHA256Thumbprint string    `json:"sha256_thumbprint"`
	SHA1Thumbprint   string    `json:"sha1_thumbprint"`
	PublicKeySHA256  string    `json:"public_key_sha256"`
	NotBefore        time.Time `json:"not_before"`
	NotAfter         time.Time `json:"not_after"`
	Chain            []string  `json:"chain"`
	Certificate      string    `json:"certificate"`
	Key              string    `json:"key"`
	SoftwareKey      bool      `json:"software_key"`
	// KeyMatchesCert is null when it is not known: the key could not be loaded (Problem says
	// why), so nothing was compared.
	KeyMatchesCert *bool  `json:"key_matches_cert"`
	Problem        string `json:"problem,omitempty"`
	// Operational, with [certificates] issuance = "dps", is the operational certificate the
	// stored state holds (the fields above are the onboarding identity's); OperationalProblem
	// says why there is none.
	Operational        *device.CertificateInfo `json:"operational,omitempty"`
	OperationalProblem string                  `json:"operational_problem,omitempty"`

	// matchUnknown says, in a few words, why KeyMatchesCert is not known.
	matchUnknown string
}

// runIdentity shows the configured identity. It reports what it can even when the identity is
// unusable, and then fails (exit 78) with the reason.
func runIdentity(ctx context.Context, e *env, args []string) error {
	tf, out, cfg, err := identityFlags(e, "identity", args)
	if err != nil {
		return err
	}
	if cfg.Attestation.Method == "symmetric_key" {
		return symmetricIdentity(ctx, e, cfg, out)
	}
	if cfg.Attestation.Method == "tpm" {
		return tpmIdentity(ctx, e, cfg, out)
	}
	tpm := tf.opener(ctx, cfg)
	defer tpm.Close()
	chain, err := tpm.LoadChain(cfg.Attestation.IdentityCert)
	if err != nil {
		return err
	}
	leaf := chain[0]
	m := attest.NewManifest(leaf)
	r := identityReport{
		RegistrationID:   m.RegistrationID,
		Subject:          leaf.Subject.String(),
		Issuer:           m.Issuer,
		Serial:           m.Serial,
		SHA256Thumbprint: m.SHA256Thumbprint,
		SHA1Thumbprint:   m.SHA1Thumbprint,
		PublicKeySHA256:  m.PublicKeySHA256,
		NotBefore:        m.NotBefore,
		NotAfter:         m.NotAfter,
		Certificate:      cfg.Attestation.IdentityCert,
		Key:              cfg.Attestation.IdentityKey,
	}
	for _, c := range chain {
		r.Chain = append(r.Chain, c.Subject.String())
	}
	problem := checkIdentity(e, tpm, cfg.Attestation.IdentityKey, chain, &r)
	if problem != nil {
		r.Problem = problem.Error()
	}
	if cfg.Certificates.Issued() {
		r.Operational, r.OperationalProblem = storedOperational(cfg, runningStatus(ctx, cfg))
	}
	if out.on {
		if err := out.print(r); err != nil {
			return err
		}
	} else {
		printIdentity(e.stdout, r)
	}
	return problem
}

// symmetricIdentityReport is `unicity identity --json` for a symmetric-key device. The key
// itself is never shown, in any form.
type symmetricIdentityReport struct {
	Attestation       string `json:"attestation"`
	RegistrationID    string `json:"registration_id"`
	SymmetricKey      string `json:"symmetric_key"`
	SymmetricKeyGroup bool   `json:"symmetric_key_group"`
	StateBinding      string `json:"state_binding,omitempty"`
	Problem           string `json:"problem,omitempty"`
}

// symmetricIdentity shows a symmetric-key identity: where the key is, whether it is usable,
// and what the stored assignment is bound to.
func symmetricIdentity(ctx context.Context, e *env, cfg *config.Config, out *jsonOutput) error {
	r := symmetricIdentityReport{
		Attestation:       cfg.Attestation.Method,
		RegistrationID:    cfg.Provisioning.RegistrationID,
		SymmetricKey:      cfg.Attestation.SymmetricKey,
		SymmetricKeyGroup: cfg.Attestation.SymmetricKeyGroup,
	}
	creds, problem := device.OpenCredentials(ctx, cfg)
	if problem == nil {
		r.StateBinding = creds.StateBinding()
		creds.Close()
	} else {
		r.Problem = problem.Error()
	}
	if out.on {
		if err := out.print(r); err != nil {
			return err
		}
		return problem
	}
	kind := "device key"
	if r.SymmetricKeyGroup {
		kind = "enrollment group key; the device key is derived from it and the registration ID"
	}
	fmt.Fprintf(e.stdout, "Registration ID:    %s\n", r.RegistrationID)
	fmt.Fprintf(e.stdout, "Attestation:        symmetric key (no certificate, no TPM)\n")
	fmt.Fprintf(e.stdout, "Key file:           %s (%s)\n", r.SymmetricKey, kind)
	if r.Problem != "" {
		fmt.Fprintf(e.stdout, "Problem:            %s\n", r.Problem)
	} else {
		fmt.Fprintf(e.stdout, "State binding:      %s\n", r.StateBinding)
	}
	return problem
}

// storedOperational is the operational certificate of the stored state, or why there is none;
// live is the running agent's status, nil when it does not run.
func storedOperational(cfg *config.Config, live *device.Status) (*device.CertificateInfo, string) {
	st, err := storage.New(cfg.State.Dir).Load()
	if err != nil {
		return nil, err.Error()
	}
	op, err := describeOperational(cfg, st, live)
	switch {
	case err != nil:
		return nil, err.Error()
	case op == nil:
		return nil, "none issued yet"
	}
	return op, ""
}

// checkIdentity loads the key and runs the identity checks, filling in what it learns.
func checkIdentity(e *env, tpm *attest.Opener, keySpec string, chain []*x509.Certificate, r *identityReport) error {
	key, err := loadKey(e, tpm, keySpec)
	if err != nil {
		switch {
		case errors.Is(err, attest.ErrTPMUnavailable):
			r.matchUnknown = "the TPM is unavailable"
		case errors.Is(err, attest.ErrNoTPM):
			r.matchUnknown = "no TPM"
		default:
			r.matchUnknown = "the key cannot be loaded"
		}
		return err
	}
	defer key.Close()
	r.Key, r.SoftwareKey = key.Location, key.Software
	match := attest.MatchKey(chain[0], key.Public()) == nil
	r.KeyMatchesCert = &match
	if _, err := attest.NewIdentity(chain, key, now()); err != nil {
		return err
	}
	if err := attest.ProveKey(key, chain[0]); err != nil {
		match = false
		return err
	}
	return nil
}

func printIdentity(w io.Writer, r identityReport) {
	var match string
	switch {
	case r.KeyMatchesCert == nil:
		match = "unknown: " + r.matchUnknown + " (see Problem)"
	case *r.KeyMatchesCert:
		match = "yes"
	default:
		match = "NO"
	}
	key := r.Key
	if r.SoftwareKey {
		key += " (software key, development only)"
	}
	fmt.Fprintf(w, "Registration ID:    %s\n", r.RegistrationID)
	fmt.Fprintf(w, "Subject:            %s\n", r.Subject)
	fmt.Fprintf(w, "Issuer:             %s\n", r.Issuer)
	fmt.Fprintf(w, "Serial:             %s\n", r.Serial)
	fmt.Fprintf(w, "Valid:              %s to %s\n", r.NotBefore.Format(time.RFC3339), r.NotAfter.Format(time.RFC3339))
	fmt.Fprintf(w, "SHA-256 thumbprint: %s\n", r.SHA256Thumbprint)
	fmt.Fprintf(w, "SHA-1 thumbprint:   %s\n", r.SHA1Thumbprint)
	fmt.Fprintf(w, "Public key SHA-256: %s\n", r.PublicKeySHA256)
	fmt.Fprintf(w, "Chain:              %d certificate(s)\n", len(r.Chain))
	fmt.Fprintf(w, "Certificate:        %s\n", r.Certificate)
	fmt.Fprintf(w, "Key:                %s\n", key)
	fmt.Fprintf(w, "Key matches cert:   %s\n", match)
	if r.Problem != "" {
		fmt.Fprintf(w, "Problem:            %s\n", r.Problem)
	}
	switch {
	case r.Operational != nil:
		printCertificate(w, *r.Operational)
	case r.OperationalProblem != "":
		fmt.Fprintf(w, "Operational:        %s\n", r.OperationalProblem)
	}
}

// tpmIdentityReport is `unicity identity --json` for TPM attestation.
type tpmIdentityReport struct {
	Attestation          string `json:"attestation"`
	RegistrationID       string `json:"registration_id,omitempty"`
	EndorsementKeySHA256 string `json:"endorsement_key_sha256,omitempty"`
	EKCertificate        bool   `json:"ek_certificate"`
	SRKHandle            string `json:"srk_handle"`
	SRKCreated           bool   `json:"srk_created"`
	IdentityKey          string `json:"identity_key"`
	IdentityKeyImported  bool   `json:"identity_key_imported"`
	StateBinding         string `json:"state_binding,omitempty"`
	Problem              string `json:"problem,omitempty"`
}

// newTPMIdentityReport opens the TPM as the agent does (creating the SRK when there is none)
// and describes what TPM attestation uses.
func newTPMIdentityReport(ctx context.Context, cfg *config.Config) (tpmIdentityReport, error) {
	r := tpmIdentityReport{Attestation: cfg.Attestation.Method, SRKHandle: cfg.Attestation.SRKHandle, IdentityKey: cfg.Attestation.IdentityKey}
	creds, err := device.OpenCredentials(ctx, cfg)
	if err != nil {
		r.Problem = err.Error()
		return r, err
	}
	defer creds.Close()
	sum := creds.Attested.EK.PublicSHA256()
	r.RegistrationID, r.EndorsementKeySHA256 = creds.RegistrationID, hex.EncodeToString(sum[:])
	r.EKCertificate = creds.Attested.EK.Certificate != nil
	r.SRKCreated, r.IdentityKeyImported = creds.Attested.SRK.Created, creds.Attested.Imported()
	r.StateBinding = creds.StateBinding()
	return r, nil
}

// srkLine says where the SRK is and whether this command made it.
func (r tpmIdentityReport) srkLine() string {
	if r.SRKCreated {
		return r.SRKHandle + " (none was there: created and persisted now)"
	}
	return r.SRKHandle + " (found)"
}

// keyLine says where DPS's identity key is kept and whether the TPM holds it yet.
func (r tpmIdentityReport) keyLine() string {
	if r.IdentityKeyImported {
		return r.IdentityKey + " (imported)"
	}
	return r.IdentityKey + " (not imported yet: the first registration imports it)"
}

// tpmIdentity shows a TPM attestation identity: the EK, the SRK and the identity key.
func tpmIdentity(ctx context.Context, e *env, cfg *config.Config, out *jsonOutput) error {
	r, problem := newTPMIdentityReport(ctx, cfg)
	if out.on {
		if err := out.print(r); err != nil {
			return err
		}
		return problem
	}
	fmt.Fprintf(e.stdout, "Attestation:        TPM (endorsement key)\n")
	if problem != nil {
		fmt.Fprintf(e.stdout, "Problem:            %s\n", r.Problem)
		return problem
	}
	fmt.Fprintf(e.stdout, "Registration ID:    %s\n", r.RegistrationID)
	fmt.Fprintf(e.stdout, "EK public SHA-256:  %s\n", r.EndorsementKeySHA256)
	fmt.Fprintf(e.stdout, "EK certificate:     %s\n", yesNo(r.EKCertificate, "in NV", "none in NV"))
	fmt.Fprintf(e.stdout, "SRK:                %s\n", r.srkLine())
	fmt.Fprintf(e.stdout, "Identity key:       %s\n", r.keyLine())
	fmt.Fprintf(e.stdout, "State binding:      %s\n", r.StateBinding)
	return nil
}

func yesNo(b bool, yes, no string) string {
	if b {
		return yes
	}
	return no
}
