package attest

import (
	"context"
	"errors"
	"fmt"

	keyfile "github.com/foxboron/go-tpm-keyfiles"
	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// ErrNotThisTPM means the TPM refused DPS's challenge: it was made for another TPM's
// endorsement key or storage root key, so the enrollment names another device. The agent
// reports it as refused by the service (77).
var ErrNotThisTPM = errors.New("the TPM attestation challenge is for another TPM")

// ImportIdentityKey answers DPS's challenge (authenticationKey, decoded from base64) inside
// the TPM, as the Azure SDKs do: the EK, authorised by a policy session with
// PolicySecret(TPM_RH_ENDORSEMENT), activates the credential, which is the key of the inner
// wrapper of the duplicated identity key; the SRK imports the duplicate. The result is the
// identity key as a keyfile under the SRK: its private part is encrypted by the TPM and may
// be stored, or given to PersistIdentityKey. The key itself never leaves the TPM, and every
// object and session the import loads is flushed again, whatever happens.
func ImportIdentityKey(ctx context.Context, tpm transport.TPM, ek *EndorsementKey, srk *StorageRootKey, authenticationKey []byte) (*keyfile.TPMKey, error) {
	ak, err := ParseAuthenticationKey(authenticationKey)
	if err != nil {
		return nil, err
	}
	var imported *tpm2.ImportResponse
	err = inSequence(tpm, func() error {
		inner, err := activateCredential(ctx, tpm, ek, srk, ak)
		if err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		switch len(inner) {
		case 16, 24, 32:
		default:
			return fmt.Errorf("%w: the credential is %d bytes, not an AES key", ErrInvalidChallenge, len(inner))
		}
		// The inner wrapper is AES-CFB with a key as long as the credential (Node SDK).
		imported, err = tpm2.Import{
			ParentHandle:  srk.parent(),
			EncryptionKey: tpm2.TPM2BData{Buffer: inner},
			ObjectPublic:  ak.Public,
			Duplicate:     ak.Duplicate,
			InSymSeed:     ak.ImportSecret,
			Symmetric: tpm2.TPMTSymDef{
				Algorithm: tpm2.TPMAlgAES,
				KeyBits:   tpm2.NewTPMUSymKeyBits(tpm2.TPMAlgAES, tpm2.TPMKeyBits(8*len(inner))),
				Mode:      tpm2.NewTPMUSymMode(tpm2.TPMAlgAES, tpm2.TPMAlgCFB),
			},
		}.Execute(tpm)
		if err != nil {
			return fmt.Errorf("%w: the storage root key %#x cannot import the identity key: %w", challengeErrorKind(tpm, err), uint32(srk.Handle), err)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return keyfile.NewTPMKey(keyfile.OIDLoadableKey, ak.Public, imported.OutPrivate, keyfile.WithParent(srk.Handle)), nil
}

// activateCredential recovers the credential with the EK; the caller holds the sequence.
func activateCredential(ctx context.Context, tpm transport.TPM, ek *EndorsementKey, srk *StorageRootKey, ak *AuthenticationKey) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	ekh, release, err := ek.load(tpm)
	if err != nil {
		return nil, err
	}
	defer release()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	sess, closeSession, err := tpm2.PolicySession(tpm, tpm2.TPMAlgSHA256, 16)
	if err != nil {
		return nil, fmt.Errorf("%w: cannot start a policy session: %w", ErrTPMUnavailable, err)
	}
	defer closeSession()
	_, err = tpm2.PolicySecret{
		AuthHandle:    tpm2.TPMRHEndorsement,
		PolicySession: sess.Handle(),
		NonceTPM:      sess.NonceTPM(),
	}.Execute(tpm)
	if err != nil {
		return nil, fmt.Errorf("%w: PolicySecret(TPM_RH_ENDORSEMENT) (has the endorsement hierarchy a password?): %w", tpmErrorKind(err, ErrInvalidKey), err)
	}
	ac, err := tpm2.ActivateCredential{
		ActivateHandle: srk.parent(),
		KeyHandle:      tpm2.AuthHandle{Handle: ekh.Handle, Name: ekh.Name, Auth: sess},
		CredentialBlob: ak.Credential,
		Secret:         ak.CredentialSecret,
	}.Execute(tpm)
	if err != nil {
		return nil, fmt.Errorf("%w: the endorsement key cannot activate the credential: %w", challengeErrorKind(tpm, err), err)
	}
	return ac.CertInfo.Buffer, nil
}

// challengeErrorKind is ErrNotThisTPM if the TPM refused the challenge, and
// ErrTPMUnavailable if it could not answer. libtpms (swtpm) answers a secret encrypted to
// another key with TPM_RC_FAILURE, yet stays usable: a TPM in failure mode refuses every
// command but GetCapability and GetTestResult, so one more command tells the two apart.
func challengeErrorKind(tpm transport.TPM, err error) error {
	if tpmRefused(err) {
		return ErrNotThisTPM
	}
	if errors.Is(err, tpm2.TPMRCFailure) {
		if _, probe := (tpm2.GetRandom{BytesRequested: 1}).Execute(tpm); probe == nil {
			return ErrNotThisTPM
		}
	}
	return ErrTPMUnavailable
}

// PersistIdentityKey makes the imported identity key k a persistent object at handle h
// (DefaultIdentityKeyHandle when 0), so it needs no keyfile and survives reboots in the TPM.
// A previous identity key there (an HMAC key) is replaced once the new one has loaded; any
// other object there is left alone and reported with ErrKeyExists.
func PersistIdentityKey(ctx context.Context, tpm transport.TPM, k *keyfile.TPMKey, h tpm2.TPMHandle) error {
	if h == 0 {
		h = DefaultIdentityKeyHandle
	}
	if !keyfile.IsMSO(h, keyfile.TPM_HT_PERSISTENT) {
		return fmt.Errorf("%w: identity key handle %#x is not a persistent handle (0x81000000 to 0x81FFFFFF)", ErrInvalidKey, uint32(h))
	}
	var previous *tpm2.NamedHandle
	rp, err := tpm2.ReadPublic{ObjectHandle: h}.Execute(tpm)
	switch {
	case err == nil:
		if pub, perr := rp.OutPublic.Contents(); perr != nil || checkHMACKey(pub) != nil {
			return fmt.Errorf("%w: TPM handle %#x holds another object than an identity key (tpm2_evictcontrol -c %#x frees it deliberately)", ErrKeyExists, uint32(h), uint32(h))
		}
		previous = &tpm2.NamedHandle{Handle: h, Name: rp.Name}
	case !errors.Is(err, tpm2.TPMRCHandle):
		return fmt.Errorf("%w: cannot read TPM handle %#x: %w", tpmErrorKind(err, ErrInvalidKey), uint32(h), err)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	return inSequence(tpm, func() error {
		loaded, err := loadHMACKeyfile(tpm, k)
		if err != nil {
			return err
		}
		defer flush(tpm, loaded.Handle)
		if previous != nil {
			if _, err := (tpm2.EvictControl{Auth: tpm2.TPMRHOwner, ObjectHandle: previous, PersistentHandle: h}).Execute(tpm); err != nil {
				return fmt.Errorf("%w: cannot remove the previous identity key at %#x: %w", tpmErrorKind(err, ErrInvalidKey), uint32(h), err)
			}
		}
		_, err = tpm2.EvictControl{
			Auth:             tpm2.TPMRHOwner,
			ObjectHandle:     loaded,
			PersistentHandle: h,
		}.Execute(tpm)
		if err != nil {
			return fmt.Errorf("%w: cannot persist the identity key at %#x: %w", tpmErrorKind(err, ErrInvalidKey), uint32(h), err)
		}
		return nil
	})
}
