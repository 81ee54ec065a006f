package attest

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/asn1"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/google/go-tpm/tpm2/transport"

	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/internal/version"
)

// Conditions callers branch on. All of them mean the identity as installed cannot
// authenticate the device; only ErrClockNotSet may clear up by itself (once time syncs).
var (
	ErrInvalidIdentity   = errors.New("invalid identity certificate")
	ErrKeyMismatch       = errors.New("certificate does not match the device key")
	ErrExpired           = errors.New("certificate expired")
	ErrClockNotSet       = errors.New("system clock is not set")
	ErrBadRegistrationID = errors.New("invalid registration ID")
)

const certSpecNV = "tpm-nv:"

// Identity is what the device authenticates with: its certificate chain (leaf first) and the
// key the leaf certifies. dps and hub take its TLSCertificate, never a TPM.
type Identity struct {
	Chain          []*x509.Certificate
	Signer         crypto.Signer
	RegistrationID string
}

// NewIdentity checks that chain and signer form a usable identity at time now and returns it.
// The checks, each with its own error: the leaf certifies signer's public key
// (ErrKeyMismatch); the leaf's CN is a DPS registration ID (ErrBadRegistrationID); every
// certificate is valid at now (ErrExpired, or ErrClockNotSet when now is before a NotBefore
// or before this build was made); each certificate is signed by the next and the leaf may
// authenticate a TLS client (ErrInvalidIdentity).
func NewIdentity(chain []*x509.Certificate, signer crypto.Signer, now time.Time) (*Identity, error) {
	return newIdentity(chain, signer, func(c *x509.Certificate) error { return CheckValidity(c, now) })
}

// ExpiredIdentity checks chain and signer as NewIdentity does, except for the validity
// window: who a device whose certificate expired is (its registration ID), for what needs no
// valid certificate. Nothing should authenticate with it where validity is checked.
func ExpiredIdentity(chain []*x509.Certificate, signer crypto.Signer) (*Identity, error) {
	return newIdentity(chain, signer, func(*x509.Certificate) error { return nil })
}

func newIdentity(chain []*x509.Certificate, signer crypto.Signer, checkValidity func(*x509.Certificate) error) (*Identity, error) {
	if len(chain) == 0 {
		return nil, fmt.Errorf("%w: no certificate", ErrInvalidIdentity)
	}
	leaf := chain[0]
	if _, err := FindLeaf(chain, signer.Public()); err != nil {
		return nil, err
	}
	regID := leaf.Subject.CommonName
	if err := ValidRegistrationID(regID); err != nil {
		return nil, fmt.Errorf("certificate CN: %w", err)
	}
	if len(leaf.ExtKeyUsage) > 0 && !slices.Contains(leaf.ExtKeyUsage, x509.ExtKeyUsageClientAuth) && !slices.Contains(leaf.ExtKeyUsage, x509.ExtKeyUsageAny) {
		return nil, fmt.Errorf("%w: certificate %q is not for TLS client authentication (extended key usage lacks clientAuth)", ErrInvalidIdentity, regID)
	}
	for i, c := range chain {
		if err := checkValidity(c); err != nil {
			return nil, err
		}
		if i+1 < len(chain) {
			if err := c.CheckSignatureFrom(chain[i+1]); err != nil {
				return nil, fmt.Errorf("%w: chain out of order: %q is not signed by the next certificate %q: %w", ErrInvalidIdentity, c.Subject.CommonName, chain[i+1].Subject.CommonName, err)
			}
		}
	}
	return &Identity{Chain: chain, Signer: signer, RegistrationID: regID}, nil
}

// MatchKey fails with ErrKeyMismatch unless cert certifies pub.
func MatchKey(cert *x509.Certificate, pub crypto.PublicKey) error {
	k, ok := pub.(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !k.Equal(cert.PublicKey) {
		return fmt.Errorf("%w: certificate %q (public key SHA-256 %s) was issued for another key", ErrKeyMismatch, cert.Subject.CommonName, PublicKeySHA256(cert.PublicKey))
	}
	return nil
}

// FindLeaf returns the certificate of chain that certifies pub. It must be the first: when
// it is a later one, the chain is in the wrong order (ErrInvalidIdentity, with that
// certificate); when none is, ErrKeyMismatch.
func FindLeaf(chain []*x509.Certificate, pub crypto.PublicKey) (*x509.Certificate, error) {
	if len(chain) == 0 {
		return nil, fmt.Errorf("%w: no certificate", ErrInvalidIdentity)
	}
	mismatch := MatchKey(chain[0], pub)
	if mismatch == nil {
		return chain[0], nil
	}
	for i, c := range chain[1:] {
		if MatchKey(c, pub) == nil {
			return c, fmt.Errorf("%w: the chain is in the wrong order: the device's certificate %q is number %d of %d; it must come first, then its issuer and each CA above it",
				ErrInvalidIdentity, c.Subject.CommonName, i+2, len(chain))
		}
	}
	return nil, mismatch
}

// CheckValidity checks cert's validity window at now. A now before NotBefore or before this
// build was made is reported as ErrClockNotSet: on a gateway without a battery-backed clock
// that is far likelier than a certificate from the future.
func CheckValidity(cert *x509.Certificate, now time.Time) error {
	if built := version.CommitTime(); now.Before(built) {
		return fmt.Errorf("%w: the time is %s, before this build was made (%s)", ErrClockNotSet, now.UTC().Format(time.RFC3339), built.Format(time.RFC3339))
	}
	if now.Before(cert.NotBefore) {
		return fmt.Errorf("%w, or certificate %q is not yet valid: the time is %s, the certificate is valid from %s", ErrClockNotSet, cert.Subject.CommonName, now.UTC().Format(time.RFC3339), cert.NotBefore.UTC().Format(time.RFC3339))
	}
	if now.After(cert.NotAfter) {
		return fmt.Errorf("%w: %q was valid until %s", ErrExpired, cert.Subject.CommonName, cert.NotAfter.UTC().Format(time.RFC3339))
	}
	return nil
}

// TLSCertificate is the identity for a TLS client: leaf plus intermediates and the signer,
// restricted to signature schemes the TPM makes reliably.
func (id *Identity) TLSCertificate() tls.Certificate {
	c := tls.Certificate{PrivateKey: id.Signer, Leaf: id.Chain[0]}
	for _, cert := range id.Chain {
		c.Certificate = append(c.Certificate, cert.Raw)
	}
	switch pub := id.Signer.Public().(type) {
	case *ecdsa.PublicKey:
		// Some TPMs lack SHA-512; one scheme leaves nothing to negotiate wrongly. TLS 1.3
		// ties the scheme to the curve.
		c.SupportedSignatureAlgorithms = []tls.SignatureScheme{tls.ECDSAWithP256AndSHA256}
		if pub.Curve == elliptic.P384() {
			c.SupportedSignatureAlgorithms = []tls.SignatureScheme{tls.ECDSAWithP384AndSHA384}
		}
	case *rsa.PublicKey:
		c.SupportedSignatureAlgorithms = []tls.SignatureScheme{tls.PSSWithSHA256, tls.PSSWithSHA384, tls.PKCS1WithSHA256, tls.PKCS1WithSHA384}
	}
	return c
}

// LoadChain reads the certificate chain named by spec: a PEM file (leaf first) or
// "tpm-nv:0x01c0000a", a TPM NV index holding the DER certificates back to back. tpm is only
// used for NV indices and may be nil otherwise.
func LoadChain(tpm transport.TPM, spec string) ([]*x509.Certificate, error) {
	if s, ok := strings.CutPrefix(spec, certSpecNV); ok {
		if tpm == nil {
			return nil, fmt.Errorf("%w: %s needs a TPM", ErrNoTPM, spec)
		}
		idx, err := ParseNVIndex(s)
		if err != nil {
			return nil, err
		}
		der, err := ReadNV(tpm, idx)
		if err != nil {
			return nil, fmt.Errorf("%w: %w", tpmErrorKind(err, ErrInvalidIdentity), err)
		}
		chain, err := parseDERChain(der)
		if err != nil {
			return nil, fmt.Errorf("%w: NV index %#x: %w", ErrInvalidIdentity, idx, err)
		}
		return chain, nil
	}
	b, err := os.ReadFile(spec)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidIdentity, err)
	}
	chain, err := certcodec.ParseCertificates(b)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrInvalidIdentity, spec, err)
	}
	return chain, nil
}

// parseDERChain parses DER certificates back to back. An NV index defined larger than its
// chain (tpm2_nvdefine -s) pads it with 0xFF or zero bytes, which are ignored.
func parseDERChain(b []byte) ([]*x509.Certificate, error) {
	var chain []*x509.Certificate
	for len(b) > 0 && b[0] == 0x30 { // an ASN.1 SEQUENCE: the next certificate
		var seq asn1.RawValue
		rest, err := asn1.Unmarshal(b, &seq)
		if err != nil {
			return nil, fmt.Errorf("certificate %d: %w", len(chain)+1, err)
		}
		c, err := x509.ParseCertificate(seq.FullBytes)
		if err != nil {
			return nil, fmt.Errorf("certificate %d: %w", len(chain)+1, err)
		}
		chain = append(chain, c)
		b = rest
	}
	if len(chain) == 0 {
		return nil, errors.New("no DER certificate")
	}
	if len(bytes.Trim(b, "\x00\xff")) > 0 {
		return nil, fmt.Errorf("%d bytes after certificate %d are neither a certificate nor padding", len(b), len(chain))
	}
	return chain, nil
}

// SHA1Thumbprint is the SHA-1 of the certificate's DER, in uppercase hex without separators.
func SHA1Thumbprint(c *x509.Certificate) string {
	sum := sha1.Sum(c.Raw)
	return strings.ToUpper(hex.EncodeToString(sum[:]))
}

// PublicKeySHA256 is the SHA-256 of the key's DER SubjectPublicKeyInfo in lowercase hex, as
// `openssl pkey -pubout -outform DER | sha256sum` prints it: it names the key, which outlives
// certificate renewals. It is empty for a key type x509 cannot encode.
func PublicKeySHA256(pub crypto.PublicKey) string {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return ""
	}
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:])
}
