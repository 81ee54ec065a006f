package attest

import (
	"context"
	"errors"
	"fmt"

	keyfile "github.com/foxboron/go-tpm-keyfiles"
	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// ErrSRKOccupied means the storage root key's handle holds a key that DPS's TPM attestation
// cannot use, such as systemd's ECC P-256 SRK at 0x81000001. It is never evicted: configure
// another free persistent handle for the RSA SRK.
var ErrSRKOccupied = errors.New("the storage root key's handle holds another kind of key")

// StorageRootKey is the persistent RSA-2048 storage key that DPS duplicates the identity key
// to, and the parent the imported key loads under.
type StorageRootKey struct {
	Handle tpm2.TPMHandle
	// Public is the key's TPM2B_PUBLIC, marshalled: DPS's "storageRootKey" takes it in base64.
	Public []byte
	// Created is set when OpenSRK made and persisted the key, rather than finding it.
	Created bool

	name tpm2.TPM2BName
}

// OpenSRK returns the storage root key at handle (DefaultSRKHandle when 0). A key already
// there is used when DPS can: an RSA-2048 restricted decryption key with AES-128-CFB and
// SHA-256, usable with an empty password (as the Azure SDKs and tpm2_createprimary make it).
// An empty handle gets one made from tpm2.RSASRKTemplate and persisted. Any other key there
// is left alone and reported with ErrSRKOccupied.
//
// The SRK is RSA because DPS is: the Identity Service, the C and the Node SDKs all send an
// RSA-2048 SRK, and nothing of DPS's encrypts an import seed to an ECC key.
func OpenSRK(ctx context.Context, tpm transport.TPM, handle tpm2.TPMHandle) (*StorageRootKey, error) {
	if handle == 0 {
		handle = DefaultSRKHandle
	}
	if !keyfile.IsMSO(handle, keyfile.TPM_HT_PERSISTENT) {
		return nil, fmt.Errorf("%w: storage root key handle %#x is not a persistent handle (0x81000000 to 0x81FFFFFF)", ErrInvalidKey, uint32(handle))
	}
	rp, err := tpm2.ReadPublic{ObjectHandle: handle}.Execute(tpm)
	switch {
	case err == nil:
		pub, err := rp.OutPublic.Contents()
		if err != nil {
			return nil, fmt.Errorf("%w: unreadable key at %#x: %w", ErrTPMUnavailable, uint32(handle), err)
		}
		if why := unusableSRK(pub); why != "" {
			return nil, fmt.Errorf("%w: %#x holds %s; DPS needs an RSA-2048 storage key: configure a free persistent handle for it, such as %#x", ErrSRKOccupied, uint32(handle), why, uint32(handle+1))
		}
		return &StorageRootKey{Handle: handle, Public: tpm2.Marshal(rp.OutPublic), name: rp.Name}, nil
	case !errors.Is(err, tpm2.TPMRCHandle):
		return nil, fmt.Errorf("%w: cannot read the storage root key at %#x: %w", tpmErrorKind(err, ErrInvalidKey), uint32(handle), err)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	srk := &StorageRootKey{Handle: handle, Created: true}
	err = inSequence(tpm, func() error {
		cp, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHOwner, InPublic: tpm2.New2B(tpm2.RSASRKTemplate)}.Execute(tpm)
		if err != nil {
			return fmt.Errorf("%w: cannot create the storage root key: %w", tpmErrorKind(err, ErrInvalidKey), err)
		}
		defer flush(tpm, cp.ObjectHandle)
		_, err = tpm2.EvictControl{
			Auth:             tpm2.TPMRHOwner,
			ObjectHandle:     &tpm2.NamedHandle{Handle: cp.ObjectHandle, Name: cp.Name},
			PersistentHandle: handle,
		}.Execute(tpm)
		if err != nil {
			return fmt.Errorf("%w: cannot persist the storage root key at %#x (has the owner hierarchy a password?): %w", tpmErrorKind(err, ErrInvalidKey), uint32(handle), err)
		}
		srk.Public, srk.name = tpm2.Marshal(cp.OutPublic), cp.Name
		return nil
	})
	if err != nil {
		return nil, err
	}
	return srk, nil
}

// unusableSRK says why pub cannot be DPS's storage root key, or "" when it can.
func unusableSRK(pub *tpm2.TPMTPublic) string {
	if pub.Type != tpm2.TPMAlgRSA {
		if pub.Type == tpm2.TPMAlgECC {
			return "an ECC key (systemd's SRK?)"
		}
		return fmt.Sprintf("a key of type %v", pub.Type)
	}
	a := pub.ObjectAttributes
	if !a.Restricted || !a.Decrypt || a.SignEncrypt || !a.FixedTPM || !a.FixedParent || !a.UserWithAuth {
		return "an RSA key that is not a storage key usable with a password"
	}
	rsa, err := pub.Parameters.RSADetail()
	if err != nil || rsa.KeyBits != 2048 || pub.NameAlg != tpm2.TPMAlgSHA256 {
		return "an RSA storage key that is not RSA-2048 with SHA-256"
	}
	bits, berr := rsa.Symmetric.KeyBits.AES()
	mode, merr := rsa.Symmetric.Mode.AES()
	if rsa.Symmetric.Algorithm != tpm2.TPMAlgAES || berr != nil || merr != nil || *bits != 128 || *mode != tpm2.TPMAlgCFB {
		return "an RSA storage key whose symmetric cipher is not AES-128-CFB"
	}
	return ""
}

// parent is the key as the parent of a command.
func (srk *StorageRootKey) parent() tpm2.AuthHandle {
	return tpm2.AuthHandle{Handle: srk.Handle, Name: srk.name, Auth: tpm2.PasswordAuth(nil)}
}
