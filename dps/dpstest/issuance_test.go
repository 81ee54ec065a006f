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
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/dps/dpstest"
)

const (
	preview = "2025-07-01-preview"
	// profiled is the first api-version whose assignments carry connectionProfile.
	profiled = "2026-11-02-preview"
)

func csrDER(t *testing.T, cn string, key crypto.Signer) []byte {
	t.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: cn}}, key)
	require.NoError(t, err)
	return der
}

func csrFor(t *testing.T, cn string, key crypto.Signer) string {
	return base64.StdEncoding.EncodeToString(csrDER(t, cn, key))
}

func parseCSR(t *testing.T, cn string, key crypto.Signer) *x509.CertificateRequest {
	t.Helper()
	csr, err := x509.ParseCertificateRequest(csrDER(t, cn, key))
	require.NoError(t, err)
	return csr
}

func ecKey(t *testing.T, c elliptic.Curve) crypto.Signer {
	t.Helper()
	k, err := ecdsa.GenerateKey(c, rand.Reader)
	require.NoError(t, err)
	return k
}

// registerCSR registers regID with a CSR from key at api-version api and returns the final
// response.
func registerCSR(t *testing.T, s *dpstest.Server, regID, api string, key crypto.Signer) response {
	t.Helper()
	d := mustDial(t, s, dialOpts{regID: regID, cert: factoryCert(t, s, regID), api: api})
	d.publish(registerTopic+"1", 1, `{"registrationId":"`+regID+`","csr":"`+csrFor(t, regID, key)+`"}`)
	r := d.next()
	if r.status != 202 {
		return r
	}
	return d.poll(r.body.OperationID)
}

func decodeChain(t *testing.T, b64s []string) []*x509.Certificate {
	t.Helper()
	var chain []*x509.Certificate
	for _, b := range b64s {
		der, err := base64.StdEncoding.DecodeString(b)
		require.NoError(t, err)
		c, err := x509.ParseCertificate(der)
		require.NoError(t, err)
		chain = append(chain, c)
	}
	return chain
}

func TestCertificateIssuance(t *testing.T) {
	reg := &assignments{}
	clock := newClock()
	s := dpstest.NewServer(t, fast, func(c *dpstest.Config) { c.Registrar, c.Now = reg, clock.Now })
	require.NoError(t, s.SetCredentialPolicy("factory", &dpstest.CredentialPolicy{Name: "short", Validity: 10 * time.Minute}))

	for _, tc := range []struct {
		name string
		key  crypto.Signer
	}{{"p256", ecKey(t, elliptic.P256())}, {"p384", ecKey(t, elliptic.P384())}} {
		t.Run(tc.name, func(t *testing.T) {
			regID := "csr-" + tc.name
			r := registerCSR(t, s, regID, preview, tc.key)
			require.Equal(t, "assigned", r.body.Status, "%s", r.raw)
			chain := decodeChain(t, r.body.RegistrationState.IssuedCertificateChain)
			require.Len(t, chain, 3, "leaf, issuing CA, root")
			leaf := chain[0]
			assert.Equal(t, regID, leaf.Subject.CommonName)
			assert.True(t, leaf.PublicKey.(interface{ Equal(crypto.PublicKey) bool }).Equal(tc.key.Public()))
			assert.True(t, chain[1].Equal(s.IssuingCA().Certificate))
			assert.True(t, chain[2].Equal(s.IssuingCA().Root()))
			assert.Equal(t, 10*time.Minute, leaf.NotAfter.Sub(leaf.NotBefore), "the policy's validity")
			assert.WithinDuration(t, clock.Now(), leaf.NotBefore, time.Second)
			inters := x509.NewCertPool()
			inters.AddCert(chain[1])
			_, err := leaf.Verify(x509.VerifyOptions{Roots: s.RootCAs(), Intermediates: inters, CurrentTime: clock.Now(),
				KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
			assert.NoError(t, err, "the issued chain verifies to the trust bundle")
			assert.Nil(t, r.body.RegistrationState.ConnectionProfile, "not before %s", profiled)

			assert.Equal(t, dpstest.DeviceAuth{Issued: leaf}, reg.last(t).Auth, "the hub takes the issued certificate, not the onboarding one")
		})
	}

	t.Run("RSA refused", func(t *testing.T) {
		key, err := rsa.GenerateKey(rand.Reader, 2048)
		require.NoError(t, err)
		r := registerCSR(t, s, "csr-rsa", preview, key)
		assert.Equal(t, 400, r.status)
		assert.Equal(t, 400010, r.body.ErrorCode)
		assert.Contains(t, r.body.Message, `credential policy "short" signs EC P-256 and EC P-384 keys, not RSA`)
	})
	t.Run("key type the policy does not allow", func(t *testing.T) {
		require.NoError(t, s.SetCredentialPolicy("factory", &dpstest.CredentialPolicy{Name: "p384", KeyTypes: []dpstest.KeyType{dpstest.KeyP384}}))
		r := registerCSR(t, s, "csr-p256", preview, ecKey(t, elliptic.P256()))
		assert.Equal(t, 400, r.status)
		assert.Contains(t, r.body.Message, "signs EC P-384 keys, not EC P-256")
		r = registerCSR(t, s, "csr-p384-only", preview, ecKey(t, elliptic.P384()))
		require.Equal(t, "assigned", r.body.Status, "%s", r.raw)
		leaf := decodeChain(t, r.body.RegistrationState.IssuedCertificateChain)[0]
		assert.Equal(t, dpstest.DefaultValidity, leaf.NotAfter.Sub(leaf.NotBefore))
	})
	t.Run("without a policy: assigned, no chain", func(t *testing.T) {
		require.NoError(t, s.SetCredentialPolicy("factory", nil))
		r := registerCSR(t, s, "csr-none", preview, ecKey(t, elliptic.P256()))
		require.Equal(t, "assigned", r.body.Status, "%s", r.raw)
		assert.Nil(t, r.body.RegistrationState.IssuedCertificateChain)
		assert.NotContains(t, string(r.raw), "issuedCertificateChain")
		a := reg.last(t)
		assert.Nil(t, a.Auth.Issued)
		assert.NotEmpty(t, a.Auth.Thumbprint, "the hub takes the onboarding certificate")
	})
	t.Run("older api-version ignores csr", func(t *testing.T) {
		require.NoError(t, s.SetCredentialPolicy("factory", &dpstest.CredentialPolicy{}))
		d := mustDial(t, s, dialOpts{regID: "old-api", cert: factoryCert(t, s, "old-api")})
		d.publish(registerTopic+"1", 1, `{"registrationId":"old-api","csr":"`+csrFor(t, "old-api", ecKey(t, elliptic.P256()))+`"}`)
		r := d.poll(d.next().body.OperationID)
		assert.Equal(t, "assigned", r.body.Status)
		assert.NotContains(t, string(r.raw), "issuedCertificateChain")
	})

	tampered := func() string {
		der := csrDER(t, "bad-csr", ecKey(t, elliptic.P256()))
		der[len(der)-1] ^= 0x01
		return base64.StdEncoding.EncodeToString(der)
	}()
	for _, tc := range []struct {
		name, regID, csr, message string
	}{
		{"CN differs from the registration ID", "csr-cn", csrFor(t, "someone-else", ecKey(t, elliptic.P256())), `csr CN "someone-else" does not match registration ID "csr-cn"`},
		{"CN differs in case", "csr-case", csrFor(t, "CSR-CASE", ecKey(t, elliptic.P256())), "does not match"},
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

func TestConnectionProfile(t *testing.T) {
	s := dpstest.NewServer(t, fast)
	d := mustDial(t, s, dialOpts{regID: "prof-1", cert: factoryCert(t, s, "prof-1"), api: profiled})
	r := d.provision("prof-1")
	require.NotNil(t, r.body.RegistrationState.ConnectionProfile, "%s", r.raw)
	assert.Equal(t, dpstest.ProfileClassic, *r.body.RegistrationState.ConnectionProfile)

	s.SetConnectionProfile(dpstest.DefaultHub, dpstest.ProfileMQTTv5)
	d = mustDial(t, s, dialOpts{regID: "prof-2", cert: factoryCert(t, s, "prof-2"), api: profiled})
	r = d.provision("prof-2")
	assert.Equal(t, dpstest.ProfileMQTTv5, *r.body.RegistrationState.ConnectionProfile)

	d = mustDial(t, s, dialOpts{regID: "prof-3", cert: factoryCert(t, s, "prof-3"), api: preview})
	r = d.provision("prof-3")
	assert.Nil(t, r.body.RegistrationState.ConnectionProfile, "older api-versions have none")
}

func TestSetCredentialPolicy(t *testing.T) {
	s := dpstest.NewServer(t, fast)
	assert.ErrorIs(t, s.SetCredentialPolicy("nobody", &dpstest.CredentialPolicy{}), dpstest.ErrNotFound)
	assert.ErrorContains(t, s.SetCredentialPolicy("factory", &dpstest.CredentialPolicy{KeyTypes: []dpstest.KeyType{"RSA-2048"}}), `key type "RSA-2048"`)
	assert.ErrorContains(t, s.SetCredentialPolicy("factory", &dpstest.CredentialPolicy{Validity: -time.Second}), "negative")

	p := &dpstest.CredentialPolicy{Name: "p", KeyTypes: []dpstest.KeyType{dpstest.KeyP256}}
	require.NoError(t, s.SetCredentialPolicy("factory", p))
	p.KeyTypes[0] = dpstest.KeyP384 // the server keeps its own copy
	r := registerCSR(t, s, "copy-1", preview, ecKey(t, elliptic.P256()))
	assert.Equal(t, "assigned", r.body.Status, "%s", r.raw)
}

// IssueCertificate is the policy as IoT Hub applies it to renewals.
func TestIssueCertificate(t *testing.T) {
	clock := newClock()
	s := dpstest.NewServer(t, fast, func(c *dpstest.Config) { c.Now = clock.Now })
	key := ecKey(t, elliptic.P256())

	_, err := s.IssueCertificate("renew-1", parseCSR(t, "renew-1", key))
	assert.ErrorIs(t, err, dpstest.ErrNotFound, "not registered")

	r := registerCSR(t, s, "renew-1", preview, key)
	require.Equal(t, "assigned", r.body.Status, "%s", r.raw)
	_, err = s.IssueCertificate("renew-1", parseCSR(t, "renew-1", key))
	assert.ErrorIs(t, err, dpstest.ErrNoCredentialPolicy)

	require.NoError(t, s.SetCredentialPolicy("factory", &dpstest.CredentialPolicy{Validity: time.Hour}))
	clock.Advance(time.Minute)
	next := ecKey(t, elliptic.P384())
	chain, err := s.IssueCertificate("renew-1", parseCSR(t, "renew-1", next))
	require.NoError(t, err)
	require.Len(t, chain, 3)
	assert.True(t, next.Public().(*ecdsa.PublicKey).Equal(chain[0].PublicKey))
	assert.Equal(t, time.Hour, chain[0].NotAfter.Sub(chain[0].NotBefore))
	assert.WithinDuration(t, clock.Now(), chain[0].NotBefore, time.Second)
	assert.NoError(t, chain[0].CheckSignatureFrom(chain[1]))

	_, err = s.IssueCertificate("renew-1", parseCSR(t, "someone-else", next))
	assert.ErrorIs(t, err, dpstest.ErrCSRRejected)
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	require.NoError(t, err)
	_, err = s.IssueCertificate("renew-1", parseCSR(t, "renew-1", rsaKey))
	assert.ErrorIs(t, err, dpstest.ErrCSRRejected)
	bad := parseCSR(t, "renew-1", next)
	bad.Signature[len(bad.Signature)-1] ^= 1
	_, err = s.IssueCertificate("renew-1", bad)
	assert.ErrorIs(t, err, dpstest.ErrCSRRejected)
}
