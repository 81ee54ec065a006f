package attest

import (
	"bytes"
	"context"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base32"
	"errors"
	"fmt"
	"strings"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// The handles and NV indices of the TPM attestation that DPS, the Azure SDKs and the Identity
// Service use (TCG EK Credential Profile 2.x, low range; TCG provisioning guidance).
const (
	// EKHandle is where a provisioned TPM keeps its RSA-2048 endorsement key.
	EKHandle tpm2.TPMHandle = 0x81010001
	// DefaultSRKHandle is the storage root key's persistent handle.
	DefaultSRKHandle tpm2.TPMHandle = 0x81000001
	// DefaultIdentityKeyHandle is where the C and Node SDKs persist the DPS identity key.
	DefaultIdentityKeyHandle tpm2.TPMHandle = 0x81000100

	ekCertIndex     tpm2.TPMHandle = 0x01c00002 // RSA 2048 EK certificate (DER)
	ekNonceIndex    tpm2.TPMHandle = 0x01c00003 // RSA 2048 EK nonce
	ekTemplateIndex tpm2.TPMHandle = 0x01c00004 // RSA 2048 EK template (TPMT_PUBLIC)
)

// EndorsementKey is the TPM's RSA-2048 endorsement key, the identity a DPS TPM enrollment
// names. Its private half never leaves the TPM, and nothing else can decrypt what DPS
// encrypts to it.
type EndorsementKey struct {
	// Public is the key's TPM2B_PUBLIC, marshalled: DPS's "endorsementKey" and the Azure
	// portal's EK field take it in base64.
	Public []byte
	// Handle is EKHandle when the TPM holds the key there persistently, 0 when it is created
	// from its template (in NV, or the TCG default) each time it is needed.
	Handle tpm2.TPMHandle
	// FromNVTemplate is set when the TPM maker's template in NV (0x01c00004, with the nonce
	// of 0x01c00003) made the key, rather than the TCG default template.
	FromNVTemplate bool
	// Certificate is the TPM maker's certificate for this key from NV (0x01c00002), nil when
	// the TPM holds none for it.
	Certificate *x509.Certificate

	template tpm2.TPMTPublic
	pub      tpm2.TPMTPublic
}

// ReadEndorsementKey finds the TPM's RSA-2048 endorsement key: the persistent one at
// EKHandle when it has the EK's attributes and policy (as swtpm_setup, tpm2_createek or the
// Azure SDKs leave it), or else the key its template makes (the TPM maker's template in NV
// when present, otherwise tpm2.RSAEKTemplate), created and flushed again. It persists
// nothing.
func ReadEndorsementKey(ctx context.Context, tpm transport.TPM) (*EndorsementKey, error) {
	present, err := nvIndicesPresent(tpm, ekCertIndex, ekTemplateIndex)
	if err != nil {
		return nil, err
	}
	ek := &EndorsementKey{template: tpm2.RSAEKTemplate}
	if present[ekTemplateIndex] {
		if ek.template, err = nvEKTemplate(tpm, present[ekNonceIndex]); err != nil {
			return nil, err
		}
		ek.FromNVTemplate = true
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	var pub *tpm2.TPMTPublic
	rp, err := tpm2.ReadPublic{ObjectHandle: EKHandle}.Execute(tpm)
	switch {
	case err == nil:
		if p, perr := rp.OutPublic.Contents(); perr == nil && sameTemplate(*p, ek.template) {
			pub, ek.Handle = p, EKHandle
		}
	case !errors.Is(err, tpm2.TPMRCHandle):
		return nil, fmt.Errorf("%w: cannot read the endorsement key at %#x: %w", tpmErrorKind(err, ErrInvalidKey), uint32(EKHandle), err)
	}
	if pub == nil {
		if pub, err = ek.create(tpm); err != nil {
			return nil, err
		}
	}
	ek.pub = *pub
	ek.Public = tpm2.Marshal(tpm2.New2B(*pub))
	if present[ekCertIndex] {
		ek.Certificate = ek.nvCertificate(tpm)
	}
	return ek, nil
}

// RegistrationID is the DPS registration ID the Azure SDKs derive from the key: SHA-256 of
// the marshalled TPM2B_PUBLIC, in lowercase base32 without padding (52 characters).
func (ek *EndorsementKey) RegistrationID() string {
	sum := ek.PublicSHA256()
	return strings.ToLower(base32.StdEncoding.WithPadding(base32.NoPadding).EncodeToString(sum[:]))
}

// PublicSHA256 is the SHA-256 of the marshalled TPM2B_PUBLIC: what the registration ID
// encodes, and what tells two TPMs apart.
func (ek *EndorsementKey) PublicSHA256() [sha256.Size]byte { return sha256.Sum256(ek.Public) }

// create makes the key from its template and flushes it again, returning its public area.
func (ek *EndorsementKey) create(tpm transport.TPM) (*tpm2.TPMTPublic, error) {
	var pub *tpm2.TPMTPublic
	err := inSequence(tpm, func() error {
		h, p, err := ek.createLoaded(tpm)
		if err != nil {
			return err
		}
		flush(tpm, h.Handle)
		pub = p
		return nil
	})
	return pub, err
}

// createLoaded makes the key from its template; the caller flushes it.
func (ek *EndorsementKey) createLoaded(tpm transport.TPM) (tpm2.NamedHandle, *tpm2.TPMTPublic, error) {
	cp, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHEndorsement, InPublic: tpm2.New2B(ek.template)}.Execute(tpm)
	if err != nil {
		return tpm2.NamedHandle{}, nil, fmt.Errorf("%w: cannot create the endorsement key (has the endorsement hierarchy a password?): %w", tpmErrorKind(err, ErrInvalidKey), err)
	}
	h := tpm2.NamedHandle{Handle: cp.ObjectHandle, Name: cp.Name}
	pub, err := cp.OutPublic.Contents()
	if err != nil {
		flush(tpm, h.Handle)
		return tpm2.NamedHandle{}, nil, fmt.Errorf("%w: unreadable endorsement key: %w", ErrTPMUnavailable, err)
	}
	return h, pub, nil
}

// load makes the key usable for one command sequence; release flushes what load created.
// A key made again from its template must be the one read before: otherwise DPS's challenge
// was encrypted to a key this TPM no longer makes.
func (ek *EndorsementKey) load(tpm transport.TPM) (h tpm2.NamedHandle, release func(), err error) {
	if ek.Handle != 0 {
		name, err := tpm2.ObjectName(&ek.pub)
		if err != nil {
			return tpm2.NamedHandle{}, nil, fmt.Errorf("%w: endorsement key: %w", ErrInvalidKey, err)
		}
		return tpm2.NamedHandle{Handle: ek.Handle, Name: *name}, func() {}, nil
	}
	h, pub, err := ek.createLoaded(tpm)
	if err != nil {
		return tpm2.NamedHandle{}, nil, err
	}
	if !bytes.Equal(tpm2.Marshal(tpm2.New2B(*pub)), ek.Public) {
		flush(tpm, h.Handle)
		return tpm2.NamedHandle{}, nil, fmt.Errorf("%w: the TPM now makes another endorsement key than it did (was the TPM cleared, or its NV template changed?)", ErrInvalidKey)
	}
	return h, func() { flush(tpm, h.Handle) }, nil
}

// nvCertificate is the certificate in NV when it certifies this key; an unreadable one, or
// one for another key (an EK made by another template), is none: DPS does not need it.
func (ek *EndorsementKey) nvCertificate(tpm transport.TPM) *x509.Certificate {
	der, err := ReadNV(tpm, ekCertIndex)
	if err != nil {
		return nil
	}
	chain, err := parseDERChain(der)
	if err != nil {
		return nil
	}
	pk, err := tpm2.Pub(ek.pub)
	if err != nil {
		return nil
	}
	if certified, ok := chain[0].PublicKey.(*rsa.PublicKey); !ok || !certified.Equal(pk) {
		return nil
	}
	return chain[0]
}

// nvEKTemplate is the TPM maker's EK template from NV; with a nonce, the nonce fills the
// start of the 256-byte unique field, as tpm2_createek and tpm2-tss apply it.
func nvEKTemplate(tpm transport.TPM, withNonce bool) (tpm2.TPMTPublic, error) {
	b, err := ReadNV(tpm, ekTemplateIndex)
	if err != nil {
		return tpm2.TPMTPublic{}, fmt.Errorf("%w: %w", tpmErrorKind(err, ErrInvalidKey), err)
	}
	t, err := tpm2.Unmarshal[tpm2.TPMTPublic](b)
	if err != nil || t.Type != tpm2.TPMAlgRSA {
		return tpm2.TPMTPublic{}, fmt.Errorf("%w: NV index %#x holds no RSA key template", ErrInvalidKey, uint32(ekTemplateIndex))
	}
	if withNonce {
		nonce, err := ReadNV(tpm, ekNonceIndex)
		if err != nil {
			return tpm2.TPMTPublic{}, fmt.Errorf("%w: %w", tpmErrorKind(err, ErrInvalidKey), err)
		}
		if len(nonce) > 256 {
			return tpm2.TPMTPublic{}, fmt.Errorf("%w: the EK nonce at NV index %#x is %d bytes, more than the key's 256", ErrInvalidKey, uint32(ekNonceIndex), len(nonce))
		}
		unique := make([]byte, 256)
		copy(unique, nonce)
		t.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: unique})
	}
	return *t, nil
}

// sameTemplate reports whether the RSA key was made from template: the same attributes,
// policy and parameters (the unique field is the key itself).
func sameTemplate(key, template tpm2.TPMTPublic) bool {
	if key.Type != tpm2.TPMAlgRSA || template.Type != tpm2.TPMAlgRSA {
		return false
	}
	empty := tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{})
	key.Unique, template.Unique = empty, empty
	return bytes.Equal(tpm2.Marshal(key), tpm2.Marshal(template))
}

// nvIndicesPresent lists which NV indices from first up to last the TPM has defined, in one
// command.
func nvIndicesPresent(tpm transport.TPM, first, last tpm2.TPMHandle) (map[tpm2.TPMHandle]bool, error) {
	r, err := tpm2.GetCapability{Capability: tpm2.TPMCapHandles, Property: uint32(first), PropertyCount: uint32(last - first + 1)}.Execute(tpm)
	if err != nil {
		return nil, fmt.Errorf("%w: cannot list NV indices: %w", ErrTPMUnavailable, err)
	}
	hs, err := r.CapabilityData.Data.Handles()
	if err != nil {
		return nil, fmt.Errorf("%w: cannot list NV indices: %w", ErrTPMUnavailable, err)
	}
	present := map[tpm2.TPMHandle]bool{}
	for _, h := range hs.Handle {
		if h >= first && h <= last {
			present[h] = true
		}
	}
	return present, nil
}
