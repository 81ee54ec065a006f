package pki_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/internal/pki"
)

func TestChainsVerify(t *testing.T) {
	for _, kt := range []pki.KeyType{pki.ECDSAP256, pki.RSA2048} {
		t.Run(kt.String(), func(t *testing.T) {
			root, err := pki.NewRoot("Test Root", pki.WithKeyType(kt))
			require.NoError(t, err)
			inter, err := root.NewIntermediate("Test Intermediate", pki.WithKeyType(kt))
			require.NoError(t, err)
			dev, err := inter.NewDevice("device-1", pki.WithKeyType(kt))
			require.NoError(t, err)

			assert.Equal(t, []*x509.Certificate{inter.Certificate, root.Certificate}, inter.Chain())
			assert.Same(t, root.Certificate, inter.Root())
			require.Len(t, dev.Chain, 2, "leaf + intermediate, root left out")
			assert.Same(t, inter.Certificate, dev.Chain[1])
			assert.Equal(t, "device-1", dev.Certificate().Subject.CommonName)
			assert.False(t, dev.Certificate().IsCA)

			inters := x509.NewCertPool()
			inters.AddCert(dev.Chain[1])
			_, err = dev.Certificate().Verify(x509.VerifyOptions{
				Roots: root.Pool(), Intermediates: inters,
				KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
			})
			assert.NoError(t, err)
			_, err = dev.Certificate().Verify(x509.VerifyOptions{
				Roots: root.Pool(), Intermediates: inters,
				KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
			})
			assert.Error(t, err, "a device certificate must not serve TLS")
		})
	}
}

func TestServerCertificateNames(t *testing.T) {
	root, err := pki.NewRoot("Test Root")
	require.NoError(t, err)
	srv, err := root.IssueServer([]string{"localhost", "127.0.0.1", "global.azure-devices-provisioning.net", "hub1.azure-devices.net", "::1"})
	require.NoError(t, err)
	cert := srv.Certificate()
	assert.Equal(t, "localhost", cert.Subject.CommonName)

	for _, name := range []string{"localhost", "127.0.0.1", "global.azure-devices-provisioning.net", "hub1.azure-devices.net", "::1"} {
		t.Run(name, func(t *testing.T) {
			_, err := cert.Verify(x509.VerifyOptions{Roots: root.Pool(), DNSName: name})
			assert.NoError(t, err)
		})
	}
	t.Run("other host refused", func(t *testing.T) {
		_, err := cert.Verify(x509.VerifyOptions{Roots: root.Pool(), DNSName: "evil.example"})
		assert.Error(t, err)
	})
	t.Run("no names", func(t *testing.T) {
		_, err := root.IssueServer(nil)
		assert.Error(t, err)
	})
}

// TestMutualTLS runs a real handshake: the server certificate and a device certificate for a
// caller-held key (as a TPM key would be) work with crypto/tls verification switched fully on.
func TestMutualTLS(t *testing.T) {
	root, err := pki.NewRoot("Test Root")
	require.NoError(t, err)
	factory, err := root.NewIntermediate("Factory CA")
	require.NoError(t, err)
	srv, err := root.IssueServer([]string{"localhost"})
	require.NoError(t, err)
	devKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	dev, err := factory.IssueDevice("device-7", devKey.Public())
	require.NoError(t, err)
	assert.Nil(t, dev.Key, "the caller holds the key")
	dev.Key = devKey

	a, b := net.Pipe()
	serverConn := tls.Server(a, &tls.Config{
		Certificates: []tls.Certificate{srv.TLSCertificate()},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    root.Pool(),
		MinVersion:   tls.VersionTLS12,
	})
	clientConn := tls.Client(b, &tls.Config{
		RootCAs:      root.Pool(),
		ServerName:   "localhost",
		Certificates: []tls.Certificate{dev.TLSCertificate()},
		MinVersion:   tls.VersionTLS12,
	})
	errc := make(chan error, 1)
	go func() { errc <- serverConn.Handshake() }()
	require.NoError(t, clientConn.Handshake())
	require.NoError(t, <-errc)
	peer := serverConn.ConnectionState().PeerCertificates
	require.Len(t, peer, 2)
	assert.Equal(t, "device-7", peer[0].Subject.CommonName)
	assert.Equal(t, "Factory CA", peer[1].Subject.CommonName)
	clientConn.Close()
	serverConn.Close()
}

func TestSignCSR(t *testing.T) {
	root, err := pki.NewRoot("Test Root")
	require.NoError(t, err)
	ecKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	require.NoError(t, err)

	for _, tc := range []struct {
		name string
		key  any
	}{{"ecdsa", ecKey}, {"rsa", rsaKey}} {
		t.Run(tc.name, func(t *testing.T) {
			der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
				Subject:  pkix.Name{CommonName: "reg-" + tc.name, Organization: []string{"Contoso"}},
				DNSNames: []string{"not-copied.example"},
			}, tc.key)
			require.NoError(t, err)
			csr, err := x509.ParseCertificateRequest(der)
			require.NoError(t, err)

			leaf, err := root.SignCSR(csr)
			require.NoError(t, err)
			cert := leaf.Certificate()
			assert.Equal(t, "reg-"+tc.name, cert.Subject.CommonName)
			assert.Equal(t, []string{"Contoso"}, cert.Subject.Organization)
			assert.Empty(t, cert.DNSNames, "requested extensions are not copied")
			assert.True(t, cert.PublicKey.(interface{ Equal(crypto.PublicKey) bool }).Equal(csr.PublicKey))
			assert.NoError(t, cert.CheckSignatureFrom(root.Certificate))
			assert.Equal(t, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, cert.ExtKeyUsage)
		})
	}

	t.Run("bad signature", func(t *testing.T) {
		der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
			Subject: pkix.Name{CommonName: "forged"},
		}, ecKey)
		require.NoError(t, err)
		csr, err := x509.ParseCertificateRequest(der)
		require.NoError(t, err)
		csr.Signature[len(csr.Signature)-1] ^= 0xff
		_, err = root.SignCSR(csr)
		assert.ErrorIs(t, err, pki.ErrBadCSR)
	})
}

func TestValidity(t *testing.T) {
	nb := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	na := nb.Add(48 * time.Hour)
	root, err := pki.NewRoot("Fixed Root", pki.WithValidity(nb, na))
	require.NoError(t, err)
	assert.Equal(t, nb, root.Certificate.NotBefore)
	assert.Equal(t, na, root.Certificate.NotAfter)

	t.Run("default leaf clamped to the CA", func(t *testing.T) {
		clock := func() time.Time { return nb.Add(time.Hour) }
		leaf, err := root.NewDevice("d", pki.WithClock(clock))
		require.NoError(t, err)
		assert.Equal(t, na, leaf.Certificate().NotAfter)
		assert.True(t, leaf.Certificate().NotBefore.Before(clock()), "backdated for clock skew")
	})
	t.Run("expired leaf rejected by verification", func(t *testing.T) {
		leaf, err := root.NewDevice("old", pki.WithValidity(nb, nb.Add(time.Minute)))
		require.NoError(t, err)
		_, err = leaf.Certificate().Verify(x509.VerifyOptions{
			Roots: root.Pool(), CurrentTime: nb.Add(time.Hour),
			KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		})
		var invalid x509.CertificateInvalidError
		require.ErrorAs(t, err, &invalid)
		assert.Equal(t, x509.Expired, invalid.Reason)
	})
	t.Run("default root lifetime", func(t *testing.T) {
		now := time.Date(2026, 11, 23, 12, 0, 0, 0, time.UTC)
		r, err := pki.NewRoot("R", pki.WithClock(func() time.Time { return now }))
		require.NoError(t, err)
		assert.Equal(t, pki.CAValidity, r.Certificate.NotAfter.Sub(r.Certificate.NotBefore))
	})
}

func TestPEMFiles(t *testing.T) {
	dir := t.TempDir()
	for _, kt := range []pki.KeyType{pki.ECDSAP256, pki.RSA2048} {
		t.Run(kt.String(), func(t *testing.T) {
			root, err := pki.NewRoot("Root", pki.WithKeyType(kt))
			require.NoError(t, err)
			inter, err := root.NewIntermediate("Inter", pki.WithKeyType(kt))
			require.NoError(t, err)
			certPath := filepath.Join(dir, kt.String()+".pem")
			keyPath := filepath.Join(dir, kt.String()+".key")
			require.NoError(t, inter.Save(certPath, keyPath))

			fi, err := os.Stat(keyPath)
			require.NoError(t, err)
			assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
			fi, err = os.Stat(certPath)
			require.NoError(t, err)
			assert.Equal(t, os.FileMode(0o644), fi.Mode().Perm())

			loaded, err := pki.LoadCA(certPath, keyPath)
			require.NoError(t, err)
			assert.True(t, loaded.Certificate.Equal(inter.Certificate))
			require.Len(t, loaded.Issuers, 1)
			assert.True(t, loaded.Root().Equal(root.Certificate))
			// The loaded CA issues certificates that chain to the same root.
			dev, err := loaded.NewDevice("d")
			require.NoError(t, err)
			assert.NoError(t, dev.Certificate().CheckSignatureFrom(inter.Certificate))
		})
	}

	t.Run("key of another certificate", func(t *testing.T) {
		a, err := pki.NewRoot("A")
		require.NoError(t, err)
		b, err := pki.NewRoot("B")
		require.NoError(t, err)
		require.NoError(t, certcodec.WriteCertificates(filepath.Join(dir, "a.pem"), a.Certificate))
		require.NoError(t, certcodec.WritePrivateKey(filepath.Join(dir, "b.key"), b.Key))
		_, err = pki.LoadCA(filepath.Join(dir, "a.pem"), filepath.Join(dir, "b.key"))
		assert.ErrorContains(t, err, "does not hold the key")
	})
	t.Run("not a CA", func(t *testing.T) {
		a, err := pki.NewRoot("A")
		require.NoError(t, err)
		dev, err := a.NewDevice("leaf")
		require.NoError(t, err)
		require.NoError(t, certcodec.WriteCertificates(filepath.Join(dir, "leaf.pem"), dev.Chain...))
		require.NoError(t, certcodec.WritePrivateKey(filepath.Join(dir, "leaf.key"), dev.Key))
		_, err = pki.LoadCA(filepath.Join(dir, "leaf.pem"), filepath.Join(dir, "leaf.key"))
		assert.ErrorContains(t, err, "not a CA")
	})
	t.Run("missing file", func(t *testing.T) {
		_, err := certcodec.ReadCertificates(filepath.Join(dir, "nope.pem"))
		assert.True(t, errors.Is(err, os.ErrNotExist))
	})
}

func TestErrors(t *testing.T) {
	_, err := pki.NewRoot("r", pki.WithKeyType(pki.KeyType(9)))
	assert.ErrorContains(t, err, "unknown key type KeyType(9)")
	root, err := pki.NewRoot("r")
	require.NoError(t, err)
	_, err = root.NewDevice("d", pki.WithKeyType(pki.KeyType(9)))
	assert.Error(t, err)
	missing := filepath.Join(t.TempDir(), "no", "such", "dir")
	assert.Error(t, root.Save(filepath.Join(missing, "ca.pem"), filepath.Join(missing, "ca.key")))
	_, err = certcodec.ReadPrivateKey(filepath.Join(missing, "ca.key"))
	assert.ErrorIs(t, err, os.ErrNotExist)
}
