package device

import (
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"strings"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/internal/pki"
	"github.com/unicity-iot/unicity/internal/version"
)

// Credentials is the configured identity, opened: the certificate chain and the key, with the
// TPM they need held open. The checked attest.Identity comes from Identity once the clock
// can judge the certificate.
type Credentials struct {
	Chain []*x509.Certificate
	Key   *attest.Key
	// RegistrationID is the configured one, when set; Identity checks it against the CN.
	RegistrationID string

	tpm transport.TPMCloser
}

// OpenCredentials opens the TPM, the key and the certificate chain the configuration names.
// Errors that configuration or factory work must fix are marked ErrIdentity; others (a TPM
// that is not ready yet) may clear up on a retry.
func OpenCredentials(cfg *Config) (*Credentials, error) {
	if cfg.Attestation.Method != "x509" {
		return nil, Mark(fmt.Errorf("attestation method %q is not supported by the agent yet", cfg.Attestation.Method), ErrIdentity)
	}
	c := &Credentials{RegistrationID: cfg.Provisioning.RegistrationID}
	if needsTPM(cfg) {
		tpm, err := attest.OpenTPM(cfg.TPM.Device)
		if err != nil {
			return nil, classifyIdentityError(err)
		}
		c.tpm = tpm
	}
	key, err := attest.LoadKey(c.tpm, cfg.Attestation.IdentityKey)
	if err != nil {
		c.Close()
		return nil, classifyIdentityError(err)
	}
	c.Key = key
	chain, err := attest.LoadChain(c.tpm, cfg.Attestation.IdentityCert)
	if err != nil {
		c.Close()
		return nil, classifyIdentityError(err)
	}
	c.Chain = chain
	return c, nil
}

func needsTPM(cfg *Config) bool {
	return strings.HasPrefix(cfg.Attestation.IdentityKey, "tpmkey:") ||
		strings.HasPrefix(cfg.Attestation.IdentityCert, "tpm-nv:")
}

// classifyIdentityError marks what only a person can fix. A TPM device node or socket that
// does not exist is a configuration error; a TPM that exists but does not answer yet, or
// answers with a warning, is not.
func classifyIdentityError(err error) error {
	var rc tpm2.TPMRC
	switch {
	case errors.Is(err, attest.ErrTPMUnavailable):
		// Busy, not ready or gone for a moment (swtpm restarting) while the key or the
		// certificate was being loaded: even if its socket is gone now, it was opened.
		return err
	case errors.As(err, &rc) && rc.IsWarning():
		// Testing, retry, yielded, out of memory: the TPM's way of saying "later".
		return err
	case errors.Is(err, attest.ErrNoTPM) && !errors.Is(err, fs.ErrNotExist):
		return err
	case errors.Is(err, attest.ErrClockNotSet):
		return err
	case errors.Is(err, attest.ErrNoTPM),
		errors.Is(err, attest.ErrInvalidKey),
		errors.Is(err, attest.ErrInvalidIdentity),
		errors.Is(err, attest.ErrKeyMismatch),
		errors.Is(err, attest.ErrBadRegistrationID),
		errors.Is(err, attest.ErrExpired),
		errors.Is(err, fs.ErrNotExist),
		errors.Is(err, fs.ErrPermission):
		return Mark(err, ErrIdentity)
	}
	return err
}

// ValidFrom is the earliest time at which the identity can be judged valid: the build time
// and every certificate's NotBefore. A clock before it has not been set yet.
func (c *Credentials) ValidFrom() time.Time {
	t := version.CommitTime()
	for _, cert := range c.Chain {
		if cert.NotBefore.After(t) {
			t = cert.NotBefore
		}
	}
	return t
}

// Identity checks the credentials at time now and returns the identity to register and
// connect with.
func (c *Credentials) Identity(now time.Time) (*attest.Identity, error) {
	id, err := attest.NewIdentity(c.Chain, c.Key, now)
	if err != nil {
		return nil, classifyIdentityError(err)
	}
	if c.RegistrationID != "" && !strings.EqualFold(c.RegistrationID, id.RegistrationID) {
		return nil, Mark(fmt.Errorf("registration ID %q in the configuration does not match the certificate's CN %q (DPS requires them equal for X.509)", c.RegistrationID, id.RegistrationID), ErrIdentity)
	}
	return id, nil
}

// Thumbprint is the SHA-256 thumbprint of the leaf certificate, which the state is bound to.
func (c *Credentials) Thumbprint() string {
	return pki.Thumbprint(c.Chain[0])
}

// Close releases the key and the TPM.
func (c *Credentials) Close() error {
	var errs []error
	if c.Key != nil {
		errs = append(errs, c.Key.Close())
	}
	if c.tpm != nil {
		errs = append(errs, c.tpm.Close())
	}
	return errors.Join(errs...)
}
