package attest

import (
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
	"time"

	keyfile "github.com/foxboron/go-tpm-keyfiles"
	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/unicity-iot/unicity/internal/atomicfile"
)

// Operational certificates (certificates.md §1–3): DPS, or later IoT Hub, issues a
// short-lived certificate for a CSR. Each issuance is for a key made for it, so renewing
// means: a new key, its certificate, and, once that works, the old key destroyed.

// NewOperationalKey creates a sign-only key in the TPM for an operational certificate
// (ECDSAP256 when alg is empty, or ECDSAP384; RSA is not issued), saves it as a TSS2 keyfile
// at path and returns it loaded. It never replaces a file. The keyfile is 0600 and appears
// whole or not at all (a power cut may leave a temporary file matching
// atomicfile.TempGlob(path), which the caller may remove); it is removed again when loading
// it fails. Nothing refers to the new key until the caller records it, so a power cut leaves
// at most a keyfile nobody uses, for the caller to destroy.
func NewOperationalKey(tpm transport.TPMCloser, alg KeyAlgorithm, path string) (*Key, error) {
	switch alg {
	case "":
		alg = ECDSAP256
	case ECDSAP256, ECDSAP384:
	default:
		return nil, fmt.Errorf("%w: operational keys are %s or %s, not %q", ErrInvalidKey, ECDSAP256, ECDSAP384, alg)
	}
	k, err := CreateKey(tpm, alg)
	switch {
	case errors.Is(err, tpm2.TPMRCCurve):
		return nil, fmt.Errorf("%w: this TPM does not implement the curve of %s: %w", ErrInvalidKey, alg, err)
	case err != nil:
		return nil, fmt.Errorf("%w: %w", tpmErrorKind(err, ErrInvalidKey), err)
	}
	if _, err := os.Lstat(path); err == nil {
		return nil, fmt.Errorf("%w: %s", ErrKeyExists, path)
	}
	if err := atomicfile.Write(path, k.Bytes(), 0o600); err != nil {
		return nil, fmt.Errorf("cannot write keyfile %s: %w", path, err)
	}
	key, err := LoadKey(tpm, keySpecTPM+path)
	if err != nil {
		os.Remove(path) // ours, just written, and unusable
		return nil, err
	}
	return key, nil
}

// DestroyKey removes a key the device no longer needs. A keyfile key ("tpmkey:PATH" or a bare
// path) is not stored in the TPM, only loaded from the file (Key.Close flushes a loaded
// copy), so destroying it removes the file; the file is checked to be a keyfile first, so a
// wrong path does not cost a certificate. A persistent key ("tpmkey:handle=0x81…") is
// evicted from the TPM. A key already gone is not an error: a destruction cut short by a
// power loss can be done again.
func DestroyKey(tpm transport.TPM, spec string) error {
	switch {
	case strings.HasPrefix(spec, keySpecHandle):
		h, err := ParsePersistentHandle(strings.TrimPrefix(spec, keySpecHandle))
		if err != nil {
			return err
		}
		if tpm == nil {
			return fmt.Errorf("%w: %s needs a TPM", ErrNoTPM, spec)
		}
		return evict(tpm, h)
	case strings.HasPrefix(spec, keySpecFile), spec == "":
		return fmt.Errorf("%w: %q is not a TPM key; the agent destroys only keys it made", ErrInvalidKey, spec)
	}
	path := strings.TrimPrefix(spec, keySpecTPM)
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("cannot destroy key %s: %w", path, err)
	}
	if _, err := keyfile.Decode(b); err != nil {
		return fmt.Errorf("%w: refusing to remove %s, which is not a TSS2 keyfile: %w", ErrInvalidKey, path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("cannot destroy key %s: %w", path, err)
	}
	return nil
}

// evict removes the persistent object at h, if there is one.
func evict(tpm transport.TPM, h tpm2.TPMHandle) error {
	rp, err := tpm2.ReadPublic{ObjectHandle: h}.Execute(tpm)
	if errors.Is(err, tpm2.TPMRCHandle) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("%w: cannot read the key at %#x: %w", tpmErrorKind(err, ErrInvalidKey), uint32(h), err)
	}
	_, err = tpm2.EvictControl{
		Auth:             tpm2.TPMRHOwner,
		ObjectHandle:     &tpm2.NamedHandle{Handle: h, Name: rp.Name},
		PersistentHandle: h,
	}.Execute(tpm)
	if err != nil {
		return fmt.Errorf("%w: cannot evict the key at %#x: %w", tpmErrorKind(err, ErrInvalidKey), uint32(h), err)
	}
	return nil
}

// Destroy closes k, flushing what it loaded, and destroys the key it was loaded from (see
// DestroyKey). Software keys are not destroyed.
func (k *Key) Destroy() error {
	if k.Software {
		return fmt.Errorf("%w: %s is a software key; the agent destroys only keys it made", ErrInvalidKey, k.Location)
	}
	if err := k.Close(); err != nil {
		return err
	}
	return DestroyKey(k.tpm, k.Location)
}

// IssuedIdentity checks a chain that DPS or IoT Hub issued for key (DER, leaf first; dps
// and hub have checked its length) as NewIdentity does, so that a chain whose leaf is for
// another key fails with ErrKeyMismatch, and returns the identity it makes with key.
func IssuedIdentity(ders [][]byte, key crypto.Signer, now time.Time) (*Identity, error) {
	chain := make([]*x509.Certificate, len(ders))
	for i, der := range ders {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, fmt.Errorf("%w: issued certificate %d: %w", ErrInvalidIdentity, i, err)
		}
		chain[i] = c
	}
	return NewIdentity(chain, key, now)
}
