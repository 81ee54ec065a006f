// Package certcodec reads and writes certificates and software keys as PEM, in memory and in
// files, and names a certificate by its thumbprint. It is what the agent and the factory
// commands need of PKI; making CAs and certificates is internal/pki's, which does not ship.
package certcodec

import (
	"bytes"
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"

	"github.com/unicity-iot/unicity/internal/atomicfile"
)

// EncodeCertificates returns the certificates as concatenated PEM blocks, in the order given.
func EncodeCertificates(certs ...*x509.Certificate) []byte {
	var b bytes.Buffer
	for _, c := range certs {
		_ = pem.Encode(&b, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}) // writes to memory cannot fail
	}
	return b.Bytes()
}

// ParseCertificates reads every CERTIFICATE block, in order; other blocks are skipped. It
// fails when there is none.
func ParseCertificates(data []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("cannot parse certificate %d: %w", len(certs)+1, err)
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, errors.New("no PEM certificate found")
	}
	return certs, nil
}

// EncodePrivateKey returns the key as a PKCS#8 "PRIVATE KEY" PEM block.
func EncodePrivateKey(key crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("cannot encode private key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// ParsePrivateKey reads the first private key block: PKCS#8, or the SEC 1 and PKCS#1 forms
// that openssl writes.
func ParsePrivateKey(data []byte) (crypto.Signer, error) {
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			return nil, errors.New("no PEM private key found")
		}
		var (
			key any
			err error
		)
		switch block.Type {
		case "PRIVATE KEY":
			key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
		case "EC PRIVATE KEY":
			key, err = x509.ParseECPrivateKey(block.Bytes)
		case "RSA PRIVATE KEY":
			key, err = x509.ParsePKCS1PrivateKey(block.Bytes)
		default:
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("cannot parse %s: %w", block.Type, err)
		}
		s, ok := key.(crypto.Signer)
		if !ok {
			return nil, fmt.Errorf("cannot use %T as a signing key", key)
		}
		return s, nil
	}
}

// WriteCertificates writes the certificates as PEM to path (mode 0644: certificates are public).
func WriteCertificates(path string, certs ...*x509.Certificate) error {
	return atomicfile.Write(path, EncodeCertificates(certs...), 0o644)
}

// WritePrivateKey writes the key as PKCS#8 PEM to path with mode 0600.
func WritePrivateKey(path string, key crypto.Signer) error {
	data, err := EncodePrivateKey(key)
	if err != nil {
		return err
	}
	return atomicfile.Write(path, data, 0o600)
}

// ReadCertificates reads a PEM certificate file.
func ReadCertificates(path string) ([]*x509.Certificate, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	certs, err := ParseCertificates(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return certs, nil
}

// ReadPrivateKey reads a PEM private key file.
func ReadPrivateKey(path string) (crypto.Signer, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	key, err := ParsePrivateKey(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return key, nil
}

// Thumbprint is the SHA-256 hash of the certificate's DER in upper-case hex, the form Azure
// shows and individual enrollments match on.
func Thumbprint(c *x509.Certificate) string {
	sum := sha256.Sum256(c.Raw)
	return fmt.Sprintf("%X", sum[:])
}
