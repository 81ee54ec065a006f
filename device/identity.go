package device

import (
	"bytes"
	"context"
	"crypto"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strings"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/config"
	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/internal/version"
	"github.com/unicity-iot/unicity/sas"
)

// Identity is what the agent registers and connects with: a checked X.509 identity, the key
// of a symmetric-key device, or the TPM of TPM attestation. Exactly one of X509, SymmetricKey
// and TPM is set.
type Identity struct {
	RegistrationID string
	X509           *attest.Identity
	// SymmetricKey is the device's own key, decoded (derived already when the configured
	// file holds an enrollment group's key). A secret: it goes to dps and hub, nowhere else.
	SymmetricKey []byte
	TPM          *TPMIdentity
	// CSR, when set, is the new key DPS is asked to issue an operational certificate for
	// ([certificates] issuance = "dps"); the identity above stays the one DPS authenticates.
	CSR crypto.Signer
}

// String names the identity without its key, so that printing it (%v, %+v, %#v, a log
// attribute) cannot leak the key.
func (id *Identity) String() string {
	return id.RegistrationID + " (" + id.Method() + ")"
}

// Method names the attestation: "X.509", "symmetric key" or "TPM".
func (id *Identity) Method() string {
	switch {
	case id.SymmetricKey != nil:
		return "symmetric key"
	case id.TPM != nil:
		return "TPM"
	}
	return "X.509"
}

// Signer signs the SAS tokens of a symmetric-key or TPM identity; nil for X.509, which
// authenticates with its certificate.
func (id *Identity) Signer() sas.Signer {
	switch {
	case id.SymmetricKey != nil:
		return attest.SymmetricKey(id.SymmetricKey)
	case id.TPM != nil:
		return id.TPM
	}
	return nil
}

// GoString is String, for %#v.
func (id *Identity) GoString() string { return id.String() }

// TPMAbsent reports an error of a TPM device node or socket that does not exist (yet).
func TPMAbsent(err error) bool {
	return errors.Is(err, attest.ErrNoTPM) && errors.Is(err, fs.ErrNotExist)
}

// Credentials is the configured identity, opened: the certificate chain and the key, with the
// TPM they need held open, or a symmetric key. The checked Identity comes from Identity once
// the clock can judge the certificate (or, for a symmetric key, date a token).
type Credentials struct {
	Chain []*x509.Certificate
	Key   *attest.Key
	// RegistrationID is the configured one, when set; Identity checks it against the CN.
	RegistrationID string

	symmetricKey []byte
	// Attested is set for TPM attestation.
	Attested *TPMIdentity
	// tpm opens the TPM if the key or the chain lives in it, or for TPM attestation; nil
	// for a symmetric key.
	tpm *attest.Opener
}

// OpenCredentials opens the TPM, the key and the certificate chain the configuration names,
// or reads the symmetric key. The TPM stays open until Close, or until ctx ends (which cuts
// short any TPM command then in flight). Errors that configuration or factory work must fix
// are marked ErrIdentity; others (a TPM that does not exist yet, or is not ready) may clear up
// on a retry.
func OpenCredentials(ctx context.Context, cfg *config.Config) (*Credentials, error) {
	switch cfg.Attestation.Method {
	case "x509":
	case "symmetric_key":
		key, err := ReadSymmetricKey(cfg.Attestation.SymmetricKey)
		if err != nil {
			return nil, Mark(err, ErrIdentity)
		}
		if cfg.Attestation.SymmetricKeyGroup {
			key = sas.DeviceKey(key, cfg.Provisioning.RegistrationID)
		}
		return &Credentials{RegistrationID: cfg.Provisioning.RegistrationID, symmetricKey: key}, nil
	case "tpm":
		return openTPMCredentials(ctx, cfg)
	default:
		return nil, Mark(fmt.Errorf("attestation method %q is not supported", cfg.Attestation.Method), ErrIdentity)
	}
	c := &Credentials{RegistrationID: cfg.Provisioning.RegistrationID, tpm: attest.NewOpener(ctx, cfg.TPM.Device)}
	key, err := c.tpm.LoadKey(cfg.Attestation.IdentityKey)
	if err != nil {
		c.Close()
		return nil, classifyIdentityError(err)
	}
	c.Key = key
	chain, err := c.tpm.LoadChain(cfg.Attestation.IdentityCert)
	if err != nil {
		c.Close()
		return nil, classifyIdentityError(err)
	}
	c.Chain = chain
	return c, nil
}

// openTPMCredentials opens the TPM of TPM attestation; the registration ID defaults to the
// one the EK makes.
func openTPMCredentials(ctx context.Context, cfg *config.Config) (*Credentials, error) {
	c := &Credentials{RegistrationID: cfg.Provisioning.RegistrationID, tpm: attest.NewOpener(ctx, cfg.TPM.Device)}
	tpm, err := c.tpm.TPM()
	if err == nil {
		c.Attested, err = openTPMIdentity(ctx, tpm, cfg.Attestation)
	}
	if err != nil {
		c.Close()
		if errors.Is(err, attest.ErrSRKOccupied) {
			return nil, Mark(err, ErrIdentity)
		}
		return nil, classifyIdentityError(err)
	}
	if c.RegistrationID == "" {
		c.RegistrationID = c.Attested.EK.RegistrationID()
	}
	return c, nil
}

// classifyIdentityError marks what only a person can fix. A TPM that does not exist yet (its
// driver loads late, swtpm starts later), does not answer yet, or answers with a warning, is
// not something a person must fix: it is waited for.
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
	case errors.Is(err, attest.ErrNoTPM):
		// The device node or socket is missing, not open to this user yet (udev sets its
		// group after it appears) or refuses connections: all of it, for now. (A malformed
		// spec is refused with the configuration.)
		return err
	case errors.Is(err, attest.ErrClockNotSet):
		return err
	case errors.Is(err, attest.ErrInvalidKey),
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
func (c *Credentials) Identity(now time.Time) (*Identity, error) {
	if c.symmetricKey != nil || c.Attested != nil {
		if now.Before(version.CommitTime()) {
			return nil, fmt.Errorf("%w: it says %s, before this build was made", attest.ErrClockNotSet, now.UTC().Format(time.RFC3339))
		}
		return &Identity{RegistrationID: c.RegistrationID, SymmetricKey: c.symmetricKey, TPM: c.Attested}, nil
	}
	id, err := attest.NewIdentity(c.Chain, c.Key, now)
	if errors.Is(err, attest.ErrExpired) {
		return nil, c.expired(err)
	}
	if err != nil {
		return nil, classifyIdentityError(err)
	}
	if c.RegistrationID != "" && !strings.EqualFold(c.RegistrationID, id.RegistrationID) {
		return nil, Mark(fmt.Errorf("registration ID %q in the configuration does not match the certificate's CN %q (DPS requires them equal for X.509)", c.RegistrationID, id.RegistrationID), ErrIdentity)
	}
	return &Identity{RegistrationID: id.RegistrationID, X509: id}, nil
}

// ExpiredIdentityError is an X.509 identity whose chain holds an expired certificate. The
// agent still knows who it is: Identity is the identity as checked at the last instant the
// whole chain was valid (its registration ID is the CN), which a stored operational
// credential keeps serving, but DPS cannot be reached with it. Certificate is the one that
// expired first. It matches attest.ErrExpired and ErrIdentity, as a command wants it.
type ExpiredIdentityError struct {
	Certificate *x509.Certificate
	Identity    *Identity
	err         error
}

func (e *ExpiredIdentityError) Error() string { return e.err.Error() }
func (e *ExpiredIdentityError) Unwrap() error { return e.err }

// expired is the ExpiredIdentityError of credentials whose chain failed with err (expired),
// or err when they would not make an identity even if it had not expired.
func (c *Credentials) expired(err error) error {
	id, verr := attest.ExpiredIdentity(c.Chain, c.Key)
	if verr != nil || (c.RegistrationID != "" && !strings.EqualFold(c.RegistrationID, id.RegistrationID)) {
		return classifyIdentityError(err)
	}
	first := c.Chain[0]
	for _, cert := range c.Chain[1:] {
		if cert.NotAfter.Before(first.NotAfter) {
			first = cert
		}
	}
	return &ExpiredIdentityError{Certificate: first, Identity: &Identity{RegistrationID: id.RegistrationID, X509: id}, err: classifyIdentityError(err)}
}

// String names the credentials without the key they hold; see Identity.String.
func (c *Credentials) String() string {
	return "credentials of " + (&Identity{RegistrationID: c.RegistrationID, SymmetricKey: c.symmetricKey, TPM: c.Attested}).String()
}

// GoString is String, for %#v.
func (c *Credentials) GoString() string { return c.String() }

// Symmetric reports a symmetric-key device.
func (c *Credentials) Symmetric() bool { return c.symmetricKey != nil }

// StateBinding is what the stored assignment is bound to, so that another identity does not
// reuse it: the leaf certificate's SHA-256 thumbprint, or for a symmetric key a one-way digest
// of it (see SymmetricKeyBinding), or for TPM attestation the EK (see TPMIdentity.Binding).
func (c *Credentials) StateBinding() string {
	if c.symmetricKey != nil {
		return SymmetricKeyBinding(c.symmetricKey)
	}
	if c.Attested != nil {
		return c.Attested.Binding()
	}
	return certcodec.Thumbprint(c.Chain[0])
}

// SymmetricKeyBinding binds the state to a symmetric key without storing the key or anything
// a key could be checked against offline more cheaply than by HMAC: "sas:" and the SHA-256 of
// HMAC-SHA256(key, "unicity-state-binding"), in upper-case hex. A new key (rotated in the
// portal and installed) changes it, and the device registers again.
func SymmetricKeyBinding(key []byte) string {
	mac := hmac.New(sha256.New, key)
	mac.Write([]byte("unicity-state-binding"))
	sum := sha256.Sum256(mac.Sum(nil))
	return "sas:" + strings.ToUpper(hex.EncodeToString(sum[:]))
}

// Symmetric keys as Azure makes them are 16 to 64 bytes; the portal shows them in base64.
const (
	minSymmetricKey = 16
	maxSymmetricKey = 64
)

// ReadSymmetricKey reads a symmetric key file: the key in base64, as the Azure portal shows
// it, surrounding white space ignored. The file must be readable by its owner only (mode 0600
// or 0400): a key other users can read is refused, as ssh refuses such private keys. Errors
// name the file and never its content.
func ReadSymmetricKey(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("cannot read the symmetric key: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("cannot read the symmetric key: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("symmetric key %s is not a regular file", path)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("symmetric key %s is readable by other users (mode %04o): make it the service user's alone (chmod 0600)", path, perm)
	}
	raw, err := io.ReadAll(io.LimitReader(f, 1024))
	if err != nil {
		return nil, fmt.Errorf("cannot read the symmetric key %s: %w", path, err)
	}
	defer clear(raw)
	text := bytes.TrimSpace(raw)
	key := make([]byte, base64.StdEncoding.DecodedLen(len(text)))
	n, err := base64.StdEncoding.Decode(key, text)
	if err != nil {
		clear(key)
		return nil, fmt.Errorf("symmetric key %s does not hold a key in base64 (as the Azure portal shows it)", path)
	}
	key = key[:n]
	if n < minSymmetricKey || n > maxSymmetricKey {
		clear(key)
		return nil, fmt.Errorf("symmetric key %s holds %d bytes; Azure's keys are %d to %d bytes", path, n, minSymmetricKey, maxSymmetricKey)
	}
	return key, nil
}

// TPM is the TPM the configuration names, opened at its first use: operational keys live in
// it whatever the onboarding key is.
func (c *Credentials) TPM() (*attest.TPM, error) {
	if c.tpm == nil {
		return nil, fmt.Errorf("%w: a symmetric-key device has no TPM configured", attest.ErrNoTPM)
	}
	return c.tpm.TPM()
}

// retryTPM makes the next TPM call open the TPM again after it failed to open.
func (c *Credentials) retryTPM() {
	if c.tpm != nil {
		c.tpm.TryAgain()
	}
}

// Reload loads the onboarding key and chain cfg names again, through the TPM c holds (a
// second opening would wait on a TPM without resource manager): a new onboarding certificate
// installed while the agent runs. The result shares c's TPM: release a replaced one with
// closeKey, and Close only the last.
func (c *Credentials) Reload(cfg *config.Config) (*Credentials, error) {
	if c.tpm == nil || c.Attested != nil {
		return nil, fmt.Errorf("%s attestation has no onboarding certificate to reload", cfg.Attestation.Method)
	}
	n := &Credentials{RegistrationID: cfg.Provisioning.RegistrationID, tpm: c.tpm}
	chain, err := c.tpm.LoadChain(cfg.Attestation.IdentityCert)
	if err != nil {
		return nil, classifyIdentityError(err)
	}
	key, err := c.tpm.LoadKey(cfg.Attestation.IdentityKey)
	if err != nil {
		return nil, classifyIdentityError(err)
	}
	n.Chain, n.Key = chain, key
	return n, nil
}

// closeKey releases the key of credentials replaced by a Reload, leaving the TPM they share.
func (c *Credentials) closeKey() {
	if c.Key != nil {
		c.Key.Close()
	}
}

// Close releases the key and the TPM.
func (c *Credentials) Close() error {
	var errs []error
	if c.Key != nil {
		errs = append(errs, c.Key.Close())
	}
	if c.Attested != nil {
		errs = append(errs, c.Attested.close())
	}
	if c.tpm != nil {
		errs = append(errs, c.tpm.Close())
	}
	return errors.Join(errs...)
}
