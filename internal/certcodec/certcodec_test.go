package certcodec_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/internal/pki"
)

func TestParse(t *testing.T) {
	ecKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	sec1, err := x509.MarshalECPrivateKey(ecKey)
	require.NoError(t, err)
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	require.NoError(t, err)

	for _, tc := range []struct {
		name    string
		data    []byte
		wantErr string
	}{
		{"sec1", pemBlock("EC PRIVATE KEY", sec1), ""},
		{"pkcs1", pemBlock("RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(rsaKey)), ""},
		{"skips other blocks", append(pemBlock("CERTIFICATE", []byte{1}), pemBlock("EC PRIVATE KEY", sec1)...), ""},
		{"empty", nil, "no PEM private key"},
		{"garbage", pemBlock("PRIVATE KEY", []byte{1, 2, 3}), "cannot parse PRIVATE KEY"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k, err := certcodec.ParsePrivateKey(tc.data)
			if tc.wantErr != "" {
				assert.ErrorContains(t, err, tc.wantErr)
				return
			}
			require.NoError(t, err)
			assert.NotNil(t, k.Public())
		})
	}

	t.Run("certificates", func(t *testing.T) {
		_, err := certcodec.ParseCertificates([]byte("no pem here"))
		assert.ErrorContains(t, err, "no PEM certificate")
		_, err = certcodec.ParseCertificates(pemBlock("CERTIFICATE", []byte{1, 2}))
		assert.ErrorContains(t, err, "cannot parse certificate 1")
	})
}

func TestThumbprint(t *testing.T) {
	root, err := pki.NewRoot("Root")
	require.NoError(t, err)
	tp := certcodec.Thumbprint(root.Certificate)
	assert.Regexp(t, "^[0-9A-F]{64}$", tp)
	other, err := pki.NewRoot("Root")
	require.NoError(t, err)
	assert.NotEqual(t, tp, certcodec.Thumbprint(other.Certificate))
}

func pemBlock(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}
