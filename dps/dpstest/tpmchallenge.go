package dpstest

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"

	"github.com/google/go-tpm/tpm2"

	"github.com/unicity-iot/unicity/attest"
)

// ErrBadTPMKey means a TPM registration's endorsement or storage root key is not one DPS
// takes: not a marshalled TPM2B_PUBLIC, or not an RSA-2048 decryption key.
var ErrBadTPMKey = errors.New("invalid TPM key")

// TPMChallenge is what DPS answers the first request of a TPM registration with (401): an
// HMAC identity key it made, which only the TPM holding the registration's endorsement key
// and storage root key can import.
type TPMChallenge struct {
	// AuthenticationKey is the challenge as the device receives it (the 401's
	// "authenticationKey", in base64 there).
	AuthenticationKey []byte
	// IdentityKey is the HMAC key DPS keeps to check the device's SAS tokens, as it keeps a
	// symmetric-key enrollment's key.
	IdentityKey []byte
}

// inner wrapper of the duplicate: AES-128-CFB, the key DPS sends as the credential.
const innerKeyBytes = 16

// NewTPMChallenge builds the challenge as DPS does, for the keys a registration sent
// (marshalled TPM2B_PUBLIC, base64-decoded): a random HMAC-SHA256 identity key, duplicated
// to the SRK with an inner wrapper whose key is the credential that MakeCredential binds to
// the SRK's name and encrypts to the EK. Like DPS, and the Azure SDKs that answer it, it
// takes RSA-2048 keys only.
func NewTPMChallenge(endorsementKey, storageRootKey []byte) (*TPMChallenge, error) {
	ek, err := parseTPMKey(endorsementKey, "endorsement key")
	if err != nil {
		return nil, err
	}
	srk, err := parseTPMKey(storageRootKey, "storage root key")
	if err != nil {
		return nil, err
	}
	ekKEM, err := tpm2.ImportEncapsulationKey(ek)
	if err != nil {
		return nil, fmt.Errorf("%w: endorsement key: %w", ErrBadTPMKey, err)
	}
	srkKEM, err := tpm2.ImportEncapsulationKey(srk)
	if err != nil {
		return nil, fmt.Errorf("%w: storage root key: %w", ErrBadTPMKey, err)
	}
	srkName, err := tpm2.ObjectName(srk)
	if err != nil {
		return nil, fmt.Errorf("%w: storage root key: %w", ErrBadTPMKey, err)
	}

	key, pub, sensitive, err := newHMACIdentityKey()
	if err != nil {
		return nil, err
	}
	name, err := tpm2.ObjectName(pub)
	if err != nil {
		return nil, err
	}
	inner := make([]byte, innerKeyBytes)
	if _, err := io.ReadFull(rand.Reader, inner); err != nil {
		return nil, err
	}
	wrapped, err := innerWrap(inner, name.Buffer, sensitive)
	if err != nil {
		return nil, err
	}
	duplicate, importSeed, err := outerWrap(srkKEM, name.Buffer, wrapped)
	if err != nil {
		return nil, fmt.Errorf("%w: storage root key: %w", ErrBadTPMKey, err)
	}
	credential, credentialSeed, err := tpm2.CreateCredential(rand.Reader, ekKEM, srkName.Buffer, inner)
	if err != nil {
		return nil, fmt.Errorf("%w: endorsement key: %w", ErrBadTPMKey, err)
	}
	ak := attest.AuthenticationKey{
		Credential:       tpm2.TPM2BIDObject{Buffer: credential},
		CredentialSecret: tpm2.TPM2BEncryptedSecret{Buffer: credentialSeed},
		Duplicate:        tpm2.TPM2BPrivate{Buffer: duplicate},
		ImportSecret:     tpm2.TPM2BEncryptedSecret{Buffer: importSeed},
		Public:           tpm2.New2B(*pub),
	}
	return &TPMChallenge{AuthenticationKey: ak.Marshal(), IdentityKey: key}, nil
}

// parseTPMKey reads a registration's key: a TPM2B_PUBLIC of an RSA-2048 decryption key.
func parseTPMKey(b []byte, what string) (*tpm2.TPMTPublic, error) {
	p, err := tpm2.Unmarshal[tpm2.TPM2BPublic](b)
	if err != nil {
		return nil, fmt.Errorf("%w: %s is not a TPM2B_PUBLIC: %w", ErrBadTPMKey, what, err)
	}
	if len(p.Bytes())+2 != len(b) {
		return nil, fmt.Errorf("%w: %s has %d bytes after its TPM2B_PUBLIC", ErrBadTPMKey, what, len(b)-2-len(p.Bytes()))
	}
	pub, err := p.Contents()
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrBadTPMKey, what, err)
	}
	if pub.Type != tpm2.TPMAlgRSA {
		return nil, fmt.Errorf("%w: %s is of type %v; DPS takes RSA-2048 keys", ErrBadTPMKey, what, pub.Type)
	}
	rsa, err := pub.Parameters.RSADetail()
	if err != nil || rsa.KeyBits != 2048 || !pub.ObjectAttributes.Decrypt || !pub.ObjectAttributes.Restricted {
		return nil, fmt.Errorf("%w: %s is not an RSA-2048 restricted decryption key", ErrBadTPMKey, what)
	}
	return pub, nil
}

// newHMACIdentityKey makes a random HMAC-SHA256 key and its TPM public and sensitive areas.
func newHMACIdentityKey() (key []byte, pub *tpm2.TPMTPublic, sensitive *tpm2.TPMTSensitive, err error) {
	key = make([]byte, sha256.Size)
	obfuscation := make([]byte, sha256.Size)
	if _, err := io.ReadFull(rand.Reader, key); err != nil {
		return nil, nil, nil, err
	}
	if _, err := io.ReadFull(rand.Reader, obfuscation); err != nil {
		return nil, nil, nil, err
	}
	// A keyed-hash object's unique field is H(obfuscation value || key) (TPM 2.0 Part 1,
	// "Public Area Creation").
	unique := sha256.Sum256(append(append([]byte(nil), obfuscation...), key...))
	pub = &tpm2.TPMTPublic{
		Type:    tpm2.TPMAlgKeyedHash,
		NameAlg: tpm2.TPMAlgSHA256,
		// Not fixedTPM nor fixedParent: the TPM imports only duplicable objects.
		ObjectAttributes: tpm2.TPMAObject{UserWithAuth: true, SignEncrypt: true},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgKeyedHash, &tpm2.TPMSKeyedHashParms{
			Scheme: tpm2.TPMTKeyedHashScheme{
				Scheme:  tpm2.TPMAlgHMAC,
				Details: tpm2.NewTPMUSchemeKeyedHash(tpm2.TPMAlgHMAC, &tpm2.TPMSSchemeHMAC{HashAlg: tpm2.TPMAlgSHA256}),
			},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgKeyedHash, &tpm2.TPM2BDigest{Buffer: unique[:]}),
	}
	sensitive = &tpm2.TPMTSensitive{
		SensitiveType: tpm2.TPMAlgKeyedHash,
		SeedValue:     tpm2.TPM2BDigest{Buffer: obfuscation},
		Sensitive:     tpm2.NewTPMUSensitiveComposite(tpm2.TPMAlgKeyedHash, &tpm2.TPM2BSensitiveData{Buffer: key}),
	}
	return key, pub, sensitive, nil
}

// innerWrap is the inner duplication wrapper (TPM 2.0 Part 1, "Inner Duplication Wrapper"):
// the TPM2B_SENSITIVE behind the digest of itself and the object's name, AES-CFB encrypted
// with a zero IV. go-tpm's CreateDuplicate makes only the outer wrapper.
func innerWrap(key, name []byte, sensitive *tpm2.TPMTSensitive) ([]byte, error) {
	sensitive2B := tpm2.Marshal(tpm2.New2B(*sensitive))
	integrity := sha256.Sum256(append(append([]byte(nil), sensitive2B...), name...))
	plain := append(tpm2.Marshal(tpm2.TPM2BDigest{Buffer: integrity[:]}), sensitive2B...)
	return cfb(key, plain)
}

// outerWrap is the outer duplication wrapper to the new parent (TPM 2.0 Part 1, "Outer
// Duplication Wrapper") around an inner-wrapped sensitive area, which go-tpm's
// CreateDuplicate cannot take: it would prefix the size of an unwrapped one. The seed is
// encapsulated to the parent with the label "DUPLICATE" as it does; it returns the
// TPM2B_PRIVATE's contents and the encrypted seed.
func outerWrap(parent tpm2.LabeledEncapsulationKey, name, wrapped []byte) (duplicate, encSeed []byte, err error) {
	seed, encSeed, err := parent.Encapsulate(rand.Reader, "DUPLICATE")
	if err != nil {
		return nil, nil, err
	}
	h, err := parent.NameAlg().Hash()
	if err != nil {
		return nil, nil, err
	}
	sym := parent.SymmetricParameters()
	bits, err := sym.KeyBits.AES()
	if err != nil || sym.Algorithm != tpm2.TPMAlgAES {
		return nil, nil, fmt.Errorf("the parent's symmetric cipher is not AES")
	}
	if mode, err := sym.Mode.AES(); err != nil || *mode != tpm2.TPMAlgCFB {
		return nil, nil, fmt.Errorf("the parent's symmetric mode is not CFB")
	}
	dupSensitive, err := cfb(tpm2.KDFa(h, seed, "STORAGE", name, nil, int(*bits)), wrapped)
	if err != nil {
		return nil, nil, err
	}
	mac := hmac.New(h.New, tpm2.KDFa(h, seed, "INTEGRITY", nil, nil, h.Size()*8))
	mac.Write(dupSensitive)
	mac.Write(name)
	return append(tpm2.Marshal(tpm2.TPM2BDigest{Buffer: mac.Sum(nil)}), dupSensitive...), encSeed, nil
}

// cfb encrypts plain with AES-CFB and a zero IV, as TPM wrappers do.
func cfb(key, plain []byte) ([]byte, error) {
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	out := make([]byte, len(plain))
	//lint:ignore SA1019 TPM 2.0 duplication and credential blobs are AES-CFB with a zero IV (Part 1 §22-24): the format, not a choice
	cipher.NewCFBEncrypter(block, make([]byte, aes.BlockSize)).XORKeyStream(out, plain)
	return out, nil
}
