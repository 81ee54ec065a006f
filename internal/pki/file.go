package pki

import (
	"crypto"
	"fmt"

	"github.com/unicity-iot/unicity/internal/certcodec"
)

// Save writes the CA's chain (its certificate first, root last) and its key.
func (ca *CA) Save(certPath, keyPath string) error {
	if err := certcodec.WritePrivateKey(keyPath, ca.Key); err != nil {
		return err
	}
	return certcodec.WriteCertificates(certPath, ca.Chain()...)
}

// LoadCA reads a CA written by Save (or by openssl: chain PEM with the CA first, and its key)
// and checks that the key belongs to the certificate and that the certificate is a CA.
func LoadCA(certPath, keyPath string) (*CA, error) {
	chain, err := certcodec.ReadCertificates(certPath)
	if err != nil {
		return nil, err
	}
	key, err := certcodec.ReadPrivateKey(keyPath)
	if err != nil {
		return nil, err
	}
	pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(chain[0].PublicKey) {
		return nil, fmt.Errorf("%s does not hold the key of the certificate in %s", keyPath, certPath)
	}
	if !chain[0].IsCA {
		return nil, fmt.Errorf("%s: %q is not a CA certificate", certPath, chain[0].Subject.CommonName)
	}
	return &CA{Certificate: chain[0], Key: key, Issuers: chain[1:]}, nil
}
