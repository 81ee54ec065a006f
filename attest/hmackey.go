package attest

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"fmt"
	"os"
	"strings"

	keyfile "github.com/foxboron/go-tpm-keyfiles"
	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// maxHMACData is the most TPM2_HMAC takes in one command (TPM2B_MAX_BUFFER on every TPM);
// a SAS token's string to sign is a few hundred bytes.
const maxHMACData = 1024

// SymmetricKey is a device key of symmetric-key attestation, held in software. Its Sign and
// HMACKey's make SAS signatures the same way, so SAS code takes either.
type SymmetricKey []byte

// Sign is HMAC-SHA256 of data with the key.
func (k SymmetricKey) Sign(_ context.Context, data []byte) ([]byte, error) {
	mac := hmac.New(sha256.New, k)
	mac.Write(data)
	return mac.Sum(nil), nil
}

// HMACKey is the DPS identity key of TPM attestation, loaded in the TPM: Sign makes SAS
// signatures with TPM2_HMAC (SHA-256), one TPM command each, and the key never leaves the
// TPM. Sign is safe for concurrent use; Close flushes what LoadHMACKey loaded.
type HMACKey struct {
	// Location is where the key lives, as the configuration names it.
	Location string

	handle tpm2.AuthHandle
	loadedKey
}

// LoadHMACKey loads the identity key named by spec: "tpmkey:handle=0x81000100" (persistent,
// see PersistIdentityKey) or "tpmkey:/path/to/keyfile" (as ImportIdentityKey made it, saved
// with WriteKeyfile; also accepted as a bare path).
func LoadHMACKey(ctx context.Context, tpm transport.TPM, spec string) (*HMACKey, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if s, ok := strings.CutPrefix(spec, keySpecHandle); ok {
		h, err := ParsePersistentHandle(s)
		if err != nil {
			return nil, err
		}
		rp, err := tpm2.ReadPublic{ObjectHandle: h}.Execute(tpm)
		if err != nil {
			return nil, fmt.Errorf("%w: no identity key at handle %#x: %w", tpmErrorKind(err, ErrInvalidKey), uint32(h), err)
		}
		pub, err := rp.OutPublic.Contents()
		if err != nil {
			return nil, fmt.Errorf("%w: handle %#x: %w", ErrInvalidKey, uint32(h), err)
		}
		if err := checkHMACKey(pub); err != nil {
			return nil, fmt.Errorf("handle %#x: %w", uint32(h), err)
		}
		return &HMACKey{Location: spec, handle: tpm2.AuthHandle{Handle: h, Name: rp.Name, Auth: tpm2.PasswordAuth(nil)}, loadedKey: loadedKey{tpm: tpm}}, nil
	}
	if spec == "" {
		return nil, fmt.Errorf("%w: no identity key configured", ErrInvalidKey)
	}
	path := strings.TrimPrefix(spec, keySpecTPM)
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidKey, err)
	}
	k, err := keyfile.Decode(b)
	if err != nil {
		return nil, fmt.Errorf("%w: %s is not a TSS2 keyfile: %w", ErrInvalidKey, path, err)
	}
	var loaded *tpm2.NamedHandle
	err = inSequence(tpm, func() error {
		if loaded, err = loadHMACKeyfile(tpm, k); err == nil {
			hold(tpm, loaded.Handle) // before another sequence may reclaim it
		}
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("cannot load identity key %s: %w", path, err)
	}
	return &HMACKey{
		Location:  keySpecTPM + path,
		handle:    tpm2.AuthHandle{Handle: loaded.Handle, Name: loaded.Name, Auth: tpm2.PasswordAuth(nil)},
		loadedKey: loadedKey{tpm: tpm, flush: loaded.Handle},
	}, nil
}

// loadHMACKeyfile loads an identity keyfile under its persistent parent, the SRK; the
// caller flushes the result.
func loadHMACKeyfile(tpm transport.TPM, k *keyfile.TPMKey) (*tpm2.NamedHandle, error) {
	if !k.Keytype.Equal(keyfile.OIDLoadableKey) {
		return nil, fmt.Errorf("%w: keyfile type %v is not a loadable key", ErrInvalidKey, k.Keytype)
	}
	pub, err := k.Pubkey.Contents()
	if err != nil {
		return nil, fmt.Errorf("%w: unreadable public area: %w", ErrInvalidKey, err)
	}
	if err := checkHMACKey(pub); err != nil {
		return nil, err
	}
	if !keyfile.IsMSO(k.Parent, keyfile.TPM_HT_PERSISTENT) {
		return nil, fmt.Errorf("%w: keyfile parent %#x is not a persistent storage root key", ErrInvalidKey, uint32(k.Parent))
	}
	rp, err := tpm2.ReadPublic{ObjectHandle: k.Parent}.Execute(tpm)
	if err != nil {
		return nil, fmt.Errorf("%w: the keyfile's parent %#x: %w", tpmErrorKind(err, ErrInvalidKey), uint32(k.Parent), err)
	}
	lr, err := tpm2.Load{
		ParentHandle: tpm2.AuthHandle{Handle: k.Parent, Name: rp.Name, Auth: tpm2.PasswordAuth(nil)},
		InPrivate:    k.Privkey,
		InPublic:     k.Pubkey,
	}.Execute(tpm)
	if err != nil {
		return nil, fmt.Errorf("%w: the TPM refused the identity key (imported under another storage root key?): %w", tpmErrorKind(err, ErrInvalidKey), err)
	}
	return &tpm2.NamedHandle{Handle: lr.ObjectHandle, Name: lr.Name}, nil
}

// Sign is HMAC-SHA256 of data (at most 1 KiB), computed by the TPM.
func (k *HMACKey) Sign(ctx context.Context, data []byte) ([]byte, error) {
	if len(data) > maxHMACData {
		return nil, fmt.Errorf("cannot sign %d bytes with the TPM's HMAC key: at most %d", len(data), maxHMACData)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	k.mu.RLock()
	defer k.mu.RUnlock()
	if k.closed {
		return nil, ErrKeyClosed
	}
	r, err := tpm2.Hmac{Handle: k.handle, Buffer: tpm2.TPM2BMaxBuffer{Buffer: data}, HashAlg: tpm2.TPMAlgSHA256}.Execute(k.tpm)
	if err != nil {
		return nil, fmt.Errorf("cannot sign with %s: %w: %w", k.Location, tpmErrorKind(err, ErrInvalidKey), err)
	}
	return r.OutHMAC.Buffer, nil
}
