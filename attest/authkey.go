package attest

import (
	"bytes"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
)

// ErrInvalidChallenge means DPS's TPM challenge (the "authenticationKey" of its 401 answer)
// is malformed: nothing of it reached the TPM.
var ErrInvalidChallenge = errors.New("invalid TPM attestation challenge")

// AuthenticationKey is DPS's TPM challenge, the "authenticationKey" of a 401 answer to a TPM
// registration (base64 of these structures back to back): an HMAC identity key DPS made,
// which only the TPM holding both the EK and the SRK the registration named can import.
type AuthenticationKey struct {
	// Credential (TPM2B_ID_OBJECT) holds the key of the duplicate's inner wrapper, bound by
	// MakeCredential to the SRK's name and encrypted under a seed for the EK.
	Credential tpm2.TPM2BIDObject
	// CredentialSecret (TPM2B_ENCRYPTED_SECRET) is that seed, encrypted to the EK.
	CredentialSecret tpm2.TPM2BEncryptedSecret
	// Duplicate (TPM2B_PRIVATE) is the identity key's sensitive area, wrapped inside with the
	// credential and outside for the SRK.
	Duplicate tpm2.TPM2BPrivate
	// ImportSecret (TPM2B_ENCRYPTED_SECRET) is the outer wrapper's seed, encrypted to the SRK.
	ImportSecret tpm2.TPM2BEncryptedSecret
	// Public (TPM2B_PUBLIC) is the identity key's public area: a keyed-hash HMAC key.
	Public tpm2.TPM2BPublic
	// Data is the optional trailing TPM2B_DATA some services add (the C SDK reads it as data
	// to decrypt); attestation does not use it.
	Data []byte
}

// ParseAuthenticationKey parses DPS's challenge strictly: every structure present, sized as
// it says, the public area an HMAC key the device can sign SAS tokens with, and nothing left
// over but one optional TPM2B_DATA. Errors name the structure and wrap ErrInvalidChallenge.
func ParseAuthenticationKey(b []byte) (*AuthenticationKey, error) {
	if len(b) == 0 {
		return nil, fmt.Errorf("%w: empty", ErrInvalidChallenge)
	}
	var ak AuthenticationKey
	fields := []struct {
		what string
		to   *[]byte
	}{
		{"TPM2B_ID_OBJECT (the credential)", &ak.Credential.Buffer},
		{"TPM2B_ENCRYPTED_SECRET (the credential's seed)", &ak.CredentialSecret.Buffer},
		{"TPM2B_PRIVATE (the duplicated identity key)", &ak.Duplicate.Buffer},
		{"TPM2B_ENCRYPTED_SECRET (the import seed)", &ak.ImportSecret.Buffer},
	}
	rest := b
	var err error
	for i, f := range fields {
		if *f.to, rest, err = nextSized(rest, i+1, f.what); err != nil {
			return nil, err
		}
	}
	var public []byte
	if public, rest, err = nextSized(rest, 5, "TPM2B_PUBLIC (the identity key's public area)"); err != nil {
		return nil, err
	}
	pub, err := tpm2.Unmarshal[tpm2.TPMTPublic](public)
	if err != nil {
		return nil, fmt.Errorf("%w: structure 5, the identity key's public area: %w", ErrInvalidChallenge, err)
	}
	if !bytes.Equal(tpm2.Marshal(pub), public) {
		return nil, fmt.Errorf("%w: structure 5, the identity key's public area, has bytes after its end", ErrInvalidChallenge)
	}
	if err := checkHMACKey(pub); err != nil {
		return nil, fmt.Errorf("%w: the identity key: %w", ErrInvalidChallenge, err)
	}
	ak.Public = tpm2.New2B(*pub)
	if len(rest) > 0 {
		d, err := unmarshalSized(rest)
		if err != nil {
			return nil, fmt.Errorf("%w: %d bytes after the identity key's public area are not a TPM2B_DATA: %w", ErrInvalidChallenge, len(rest), err)
		}
		if extra := len(rest) - 2 - len(d.Buffer); extra > 0 {
			return nil, fmt.Errorf("%w: %d bytes after the trailing TPM2B_DATA", ErrInvalidChallenge, extra)
		}
		ak.Data = append([]byte{}, d.Buffer...) // present, if empty
	}
	return &ak, nil
}

// nextSized takes the n-th structure, a non-empty TPM2B, from the front of b.
func nextSized(b []byte, n int, what string) (content, rest []byte, err error) {
	if len(b) == 0 {
		return nil, nil, fmt.Errorf("%w: structure %d, %s, is missing", ErrInvalidChallenge, n, what)
	}
	d, err := unmarshalSized(b)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: structure %d, %s, is truncated: %w", ErrInvalidChallenge, n, what, err)
	}
	if len(d.Buffer) == 0 {
		return nil, nil, fmt.Errorf("%w: structure %d, %s, is empty", ErrInvalidChallenge, n, what)
	}
	return d.Buffer, b[2+len(d.Buffer):], nil
}

// unmarshalSized reads the TPM2B at the front of b. go-tpm reads a size field cut short as 0.
func unmarshalSized(b []byte) (*tpm2.TPM2BData, error) {
	if len(b) < 2 {
		return nil, fmt.Errorf("%d byte where a 2-byte size is due", len(b))
	}
	return tpm2.Unmarshal[tpm2.TPM2BData](b)
}

// Marshal is the challenge as DPS sends it (before base64).
func (ak *AuthenticationKey) Marshal() []byte {
	var b []byte
	b = append(b, tpm2.Marshal(ak.Credential)...)
	b = append(b, tpm2.Marshal(ak.CredentialSecret)...)
	b = append(b, tpm2.Marshal(ak.Duplicate)...)
	b = append(b, tpm2.Marshal(ak.ImportSecret)...)
	b = append(b, tpm2.Marshal(ak.Public)...)
	if ak.Data != nil {
		b = append(b, tpm2.Marshal(tpm2.TPM2BData{Buffer: ak.Data})...)
	}
	return b
}

// checkHMACKey admits what the device signs SAS tokens with: an unrestricted keyed-hash key
// with the HMAC-SHA256 scheme (or none, SHA-256 then being asked for), usable with an empty
// password.
func checkHMACKey(pub *tpm2.TPMTPublic) error {
	if pub.Type != tpm2.TPMAlgKeyedHash {
		return fmt.Errorf("%w: a key of type %v, not a keyed-hash (HMAC) key", ErrInvalidKey, pub.Type)
	}
	a := pub.ObjectAttributes
	if !a.SignEncrypt || a.Decrypt || a.Restricted || !a.UserWithAuth {
		return fmt.Errorf("%w: the HMAC key is not an unrestricted signing key usable with a password", ErrInvalidKey)
	}
	params, err := pub.Parameters.KeyedHashDetail()
	if err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidKey, err)
	}
	switch params.Scheme.Scheme {
	case tpm2.TPMAlgNull:
		return nil
	case tpm2.TPMAlgHMAC:
		if h, err := params.Scheme.Details.HMAC(); err == nil && h.HashAlg == tpm2.TPMAlgSHA256 {
			return nil
		}
	}
	return fmt.Errorf("%w: the key's scheme is not HMAC-SHA256", ErrInvalidKey)
}
