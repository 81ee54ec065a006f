package attest

import (
	"errors"
	"fmt"
	"os"

	keyfile "github.com/foxboron/go-tpm-keyfiles"
	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// ErrKeyExists means key generation would replace a key: a device's key is bound by its
// certificate, so it is removed only deliberately, never overwritten.
var ErrKeyExists = errors.New("device key already exists")

// KeyAlgorithm names a device key type, as `factory keygen --alg` takes it.
type KeyAlgorithm string

// The key types DPS accepts for X.509 attestation. ECDSA P-256 is the default: TLS 1.3 with
// an RSA key needs PSS signatures, which some TPMs make with a salt strict verifiers reject.
// ECDSA P-384 is for operational certificates only (one Azure page requires it for issued
// certificates); a TPM need not implement the curve (TCG PC Client makes only P-256
// mandatory), so it is never the default.
const (
	ECDSAP256 KeyAlgorithm = "ecdsa-p256"
	ECDSAP384 KeyAlgorithm = "ecdsa-p384"
	RSA2048   KeyAlgorithm = "rsa-2048"
)

// ParseKeyAlgorithm checks a --alg value of factory keygen: the onboarding key's types.
func ParseKeyAlgorithm(s string) (KeyAlgorithm, error) {
	switch a := KeyAlgorithm(s); a {
	case ECDSAP256, RSA2048:
		return a, nil
	}
	return "", fmt.Errorf("unknown key algorithm %q: want %s or %s", s, ECDSAP256, RSA2048)
}

// keyTemplate is a sign-only key that cannot leave the TPM. NoDA keeps it signing while
// another program's wrong PINs have the TPM in dictionary-attack lockout: an unattended
// device must not lose its identity to that.
func keyTemplate(alg KeyAlgorithm) tpm2.TPMTPublic {
	curve := tpm2.TPMECCNistP256
	if alg == ECDSAP384 {
		curve = tpm2.TPMECCNistP384
	}
	t := tpm2.TPMTPublic{
		Type:    tpm2.TPMAlgECC,
		NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{
			FixedTPM:            true,
			FixedParent:         true,
			SensitiveDataOrigin: true,
			UserWithAuth:        true,
			SignEncrypt:         true,
			NoDA:                true,
		},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			CurveID: curve,
			Scheme:  tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgNull},
		}),
	}
	if alg == RSA2048 {
		t.Type = tpm2.TPMAlgRSA
		t.Parameters = tpm2.NewTPMUPublicParms(tpm2.TPMAlgRSA, &tpm2.TPMSRSAParms{
			Scheme:  tpm2.TPMTRSAScheme{Scheme: tpm2.TPMAlgNull},
			KeyBits: 2048,
		})
	}
	return t
}

// createSRK creates the storage root key that tpm2-tss and tpm2-openssl derive for a
// hierarchy such as the owner's, 0x40000001 (the TCG H-2 ECC P-256 template), so keyfiles
// interoperate both ways. The caller flushes it.
func createSRK(tpm transport.TPM, hierarchy tpm2.TPMHandle) (*tpm2.CreatePrimaryResponse, error) {
	srk, err := tpm2.CreatePrimary{
		PrimaryHandle: hierarchy,
		InPublic:      tpm2.New2B(keyfile.ECCSRK_H2_Template),
	}.Execute(tpm)
	if err != nil {
		return nil, fmt.Errorf("cannot create the storage root key: %w", err)
	}
	return srk, nil
}

// CreateKey makes a new key inside the TPM under the owner hierarchy's H-2 storage root key
// and returns it as a TSS2 keyfile (without a description: tpm2-openssl 1.1.1 cannot read one).
func CreateKey(tpm transport.TPMCloser, alg KeyAlgorithm) (*keyfile.TPMKey, error) {
	switch alg {
	case ECDSAP256, ECDSAP384, RSA2048:
	default:
		return nil, fmt.Errorf("unknown key algorithm %q: want %s, %s or %s", alg, ECDSAP256, ECDSAP384, RSA2048)
	}
	var cr *tpm2.CreateResponse
	create := func() error {
		srk, err := createSRK(tpm, tpm2.TPMRHOwner)
		if err != nil {
			return err
		}
		defer flush(tpm, srk.ObjectHandle)
		cr, err = tpm2.Create{
			ParentHandle: tpm2.AuthHandle{Handle: srk.ObjectHandle, Name: srk.Name, Auth: tpm2.PasswordAuth(nil)},
			InPublic:     tpm2.New2B(keyTemplate(alg)),
		}.Execute(tpm)
		if err != nil {
			return fmt.Errorf("cannot create a %s key in the TPM: %w", alg, err)
		}
		return nil
	}
	err := inSequence(tpm, func() error {
		err := create()
		// The storage root key and the new key need slots beside the keys this program
		// holds (the agent's onboarding and operational keys, when it renews).
		if outOfMemory(err) && (reclaimFor(tpm) || evictFor(tpm, nil)) {
			err = create()
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	return keyfile.NewTPMKey(keyfile.OIDLoadableKey, cr.OutPublic, cr.OutPrivate, keyfile.WithParent(tpm2.TPMRHOwner)), nil
}

// WriteKeyfile saves k at path (0600), refusing to replace any existing file.
func WriteKeyfile(path string, k *keyfile.TPMKey) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, os.ErrExist) {
		return fmt.Errorf("%w: %s (remove it deliberately if its certificate is revoked)", ErrKeyExists, path)
	}
	if err != nil {
		return fmt.Errorf("cannot write keyfile: %w", err)
	}
	err = keyfile.Encode(f, k)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path) // ours, just created: leave no half-written key behind
		return fmt.Errorf("cannot write keyfile %s: %w", path, err)
	}
	return nil
}

// Persist makes k a persistent object at handle h (0x81xxxxxx), refusing an occupied handle.
func Persist(tpm transport.TPMCloser, k *keyfile.TPMKey, h tpm2.TPMHandle) error {
	if !keyfile.IsMSO(h, keyfile.TPM_HT_PERSISTENT) {
		return fmt.Errorf("%w: handle %#x is not a persistent handle (0x81000000 to 0x81FFFFFF)", ErrInvalidKey, uint32(h))
	}
	if _, err := (tpm2.ReadPublic{ObjectHandle: h}).Execute(tpm); err == nil {
		return fmt.Errorf("%w: TPM handle %#x is occupied (tpm2_evictcontrol -c %#x frees it deliberately)", ErrKeyExists, uint32(h), uint32(h))
	}
	loaded, err := loadKeyfile(tpm, k)
	if err != nil {
		return err
	}
	defer loaded.Close()
	hs := loaded.flush
	rp, err := tpm2.ReadPublic{ObjectHandle: hs}.Execute(tpm)
	if err != nil {
		return fmt.Errorf("cannot read the loaded key: %w", err)
	}
	_, err = tpm2.EvictControl{
		Auth:             tpm2.TPMRHOwner,
		ObjectHandle:     &tpm2.NamedHandle{Handle: hs, Name: rp.Name},
		PersistentHandle: h,
	}.Execute(tpm)
	if err != nil {
		return fmt.Errorf("cannot persist the key at %#x: %w", uint32(h), err)
	}
	return nil
}

func flush(tpm transport.TPM, h tpm2.TPMHandle) {
	// A failed flush leaves nothing to do: the handle is gone or the TPM is.
	_, _ = tpm2.FlushContext{FlushHandle: h}.Execute(tpm)
}
