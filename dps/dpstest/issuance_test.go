package dpstest_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/dps/dpstest"
	"github.com/unicity-iot/unicity/internal/certcodec"
)

func csrFor(t *testing.T, cn string, key crypto.Signer) string {
	t.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: cn}}, key)
	require.NoError(t, err)
	return base64.StdEncoding.EncodeToString(der)
}

func TestCertificateIssuance(t *testing.T) {
	reg := &assignments{}
	s := dpstest.NewServer(t, fast, func(c *dpstest.Config) { c.Registrar = reg })
	ecKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	require.NoError(t, err)

	const preview = "2025-07-01-preview"
	for _, tc := range []struct {
		name string
		key  crypto.Signer
	}{{"ecdsa", ecKey}, {"rsa", rsaKey}} {
		t.Run(tc.name, func(t *testing.T) {
			regID := "csr-" + tc.name
			d := mustDial(t, s, dialOpts{regID: regID, cert: factoryCert(t, s, regID), api: preview})
			d.publish(registerTopic+"1", 1, `{"registrationId":"`+regID+`","csr":"`+csrFor(t, regID, tc.key)+`"}`)
			r := d.poll(d.next().body.OperationID)
			require.Equal(t, "assigned", r.body.Status, "%s", r.raw)

			chainB64 := r.body.RegistrationState.IssuedCertificateChain
			require.Len(t, chainB64, 3, "leaf, issuing CA, root")
			var chain []*x509.Certificate
			for _, b := range chainB64 {
				der, err := base64.StdEncoding.DecodeString(b)
				require.NoError(t, err)
				c, err := x509.ParseCertificate(der)
				require.NoError(t, err)
				chain = append(chain, c)
			}
			leaf := chain[0]
			assert.Equal(t, regID, leaf.Subject.CommonName)
			assert.True(t, leaf.PublicKey.(interface{ Equal(crypto.PublicKey) bool }).Equal(tc.key.Public()))
			assert.True(t, chain[1].Equal(s.IssuingCA().Certificate))
			assert.True(t, chain[2].Equal(s.IssuingCA().Root()))
			inters := x509.NewCertPool()
			inters.AddCert(chain[1])
			_, err := leaf.Verify(x509.VerifyOptions{Roots: s.RootCAs(), Intermediates: inters,
				KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
			assert.NoError(t, err, "the issued chain verifies to the trust bundle")

			a := reg.last(t)
			assert.Equal(t, certcodec.Thumbprint(leaf), a.Auth.Thumbprint, "the hub expects the issued certificate")
			assert.Equal(t, s.IssuingCA().Certificate, a.Auth.CA)
		})
	}

	t.Run("older api-version ignores csr", func(t *testing.T) {
		d := mustDial(t, s, dialOpts{regID: "old-api", cert: factoryCert(t, s, "old-api")})
		d.publish(registerTopic+"1", 1, `{"registrationId":"old-api","csr":"`+csrFor(t, "old-api", ecKey)+`"}`)
		r := d.poll(d.next().body.OperationID)
		assert.Equal(t, "assigned", r.body.Status)
		assert.Nil(t, r.body.RegistrationState.IssuedCertificateChain)
		assert.NotContains(t, string(r.raw), "issuedCertificateChain")
	})

	tampered := func() string {
		der, err := base64.StdEncoding.DecodeString(csrFor(t, "bad-csr", ecKey))
		require.NoError(t, err)
		der[len(der)-1] ^= 0x01
		return base64.StdEncoding.EncodeToString(der)
	}()
	for _, tc := range []struct {
		name, regID, csr, message string
	}{
		{"CN differs from the registration ID", "csr-cn", csrFor(t, "someone-else", ecKey), `csr CN "someone-else" does not match registration ID "csr-cn"`},
		{"CN differs in case", "csr-case", csrFor(t, "CSR-CASE", ecKey), "does not match"},
		{"not base64", "bad-csr", "-----BEGIN CERTIFICATE REQUEST-----", "not base64"},
		{"not a CSR", "bad-csr", base64.StdEncoding.EncodeToString([]byte("hello")), "not a PKCS#10"},
		{"bad signature", "bad-csr", tampered, "signature"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := mustDial(t, s, dialOpts{regID: tc.regID, cert: factoryCert(t, s, tc.regID), api: preview})
			d.publish(registerTopic+"1", 1, `{"registrationId":"`+tc.regID+`","csr":"`+tc.csr+`"}`)
			r := d.next()
			assert.Equal(t, 400, r.status)
			assert.Equal(t, 400010, r.body.ErrorCode)
			assert.Contains(t, r.body.Message, tc.message)
		})
	}
}
