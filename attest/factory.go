package attest

import (
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"time"

	"github.com/unicity-iot/unicity/internal/certcodec"
)

// CreateCSR makes a certificate signing request for registrationID (the subject CN), signed
// by the device key.
func CreateCSR(signer crypto.Signer, registrationID string) ([]byte, error) {
	if err := ValidRegistrationID(registrationID); err != nil {
		return nil, err
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{CommonName: registrationID},
	}, signer)
	if err != nil {
		return nil, fmt.Errorf("cannot make the CSR: %w", err)
	}
	return der, nil
}

// Manifest is the record of one installed identity that an OEM collects per device for bulk
// enrollment (DPS individual enrollments take the thumbprints) and traceability.
type Manifest struct {
	RegistrationID   string    `json:"registration_id"`
	SHA256Thumbprint string    `json:"sha256_thumbprint"`
	SHA1Thumbprint   string    `json:"sha1_thumbprint"`
	PublicKeySHA256  string    `json:"public_key_sha256"`
	Serial           string    `json:"serial"`
	NotBefore        time.Time `json:"not_before"`
	NotAfter         time.Time `json:"not_after"`
	Issuer           string    `json:"issuer"`
}

// NewManifest describes an identity's leaf certificate. The serial is its bytes in uppercase
// hex (an even number of digits), as the Azure portal and OpenSSL show it.
func NewManifest(leaf *x509.Certificate) Manifest {
	serial := fmt.Sprintf("%X", leaf.SerialNumber.Bytes())
	if serial == "" {
		serial = "00"
	}
	return Manifest{
		RegistrationID:   leaf.Subject.CommonName,
		SHA256Thumbprint: certcodec.Thumbprint(leaf),
		SHA1Thumbprint:   SHA1Thumbprint(leaf),
		PublicKeySHA256:  PublicKeySHA256(leaf.PublicKey),
		Serial:           serial,
		NotBefore:        leaf.NotBefore.UTC(),
		NotAfter:         leaf.NotAfter.UTC(),
		Issuer:           leaf.Issuer.String(),
	}
}
