package attest_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	keyfile "github.com/foxboron/go-tpm-keyfiles"
	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/attest/attesttest"
	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/internal/pki"
)

// tpms are the TPMs every TPM test runs on. The simulator is a process-wide singleton, so
// these tests are not parallel.
var tpms = []struct {
	name string
	open func(testing.TB) transport.TPMCloser
}{
	{"simulator", attesttest.Simulator},
	{"swtpm", attesttest.SWTPM},
}

var algs = []attest.KeyAlgorithm{attest.ECDSAP256, attest.RSA2048}

// newKey creates a key of alg in tpm, saves it as a keyfile and loads it back.
func newKey(t testing.TB, tpm transport.TPMCloser, alg attest.KeyAlgorithm) (*attest.Key, string) {
	t.Helper()
	k, err := attest.CreateKey(tpm, alg)
	require.NoError(t, err)
	path := filepath.Join(t.TempDir(), "device.key")
	require.NoError(t, attest.WriteKeyfile(path, k))
	key, err := attest.LoadKey(tpm, "tpmkey:"+path)
	require.NoError(t, err)
	t.Cleanup(func() { key.Close() })
	return key, path
}

// transientHandles counts the objects loaded in the TPM.
func transientHandles(t testing.TB, tpm transport.TPM) int {
	t.Helper()
	return countHandles(t, tpm, 0x80000000)
}

// countHandles counts the TPM's handles from first on, of first's type.
func countHandles(t testing.TB, tpm transport.TPM, first uint32) int {
	t.Helper()
	r, err := tpm2.GetCapability{Capability: tpm2.TPMCapHandles, Property: first, PropertyCount: 64}.Execute(tpm)
	require.NoError(t, err)
	h, err := r.CapabilityData.Data.Handles()
	require.NoError(t, err)
	return len(h.Handle)
}

func verify(t testing.TB, pub crypto.PublicKey, digest, sig []byte, opts crypto.SignerOpts) {
	t.Helper()
	switch pub := pub.(type) {
	case *ecdsa.PublicKey:
		require.True(t, ecdsa.VerifyASN1(pub, digest, sig), "ECDSA signature does not verify")
	case *rsa.PublicKey:
		if pss, ok := opts.(*rsa.PSSOptions); ok {
			require.NoError(t, rsa.VerifyPSS(pub, opts.HashFunc(), digest, sig, pss))
		} else {
			require.NoError(t, rsa.VerifyPKCS1v15(pub, opts.HashFunc(), digest, sig))
		}
	default:
		t.Fatalf("unexpected public key %T", pub)
	}
}

// testCA is a root with an intermediate, as an OEM factory CA usually is.
func testCA(t testing.TB) (*pki.CA, *x509.CertPool) {
	t.Helper()
	root, err := pki.NewRoot("unicity test root")
	require.NoError(t, err)
	ica, err := root.NewIntermediate("unicity test factory CA")
	require.NoError(t, err)
	return ica, root.Pool()
}

// enroll runs the factory flow: CSR signed in the TPM, certificate from the test CA, identity
// checked.
func enroll(t testing.TB, key crypto.Signer, ca *pki.CA, regID string) *attest.Identity {
	t.Helper()
	der, err := attest.CreateCSR(key, regID)
	require.NoError(t, err)
	csr, err := x509.ParseCertificateRequest(der)
	require.NoError(t, err)
	require.NoError(t, csr.CheckSignature())
	leaf, err := ca.SignCSR(csr)
	require.NoError(t, err)
	id, err := attest.NewIdentity(leaf.Chain, key, time.Now())
	require.NoError(t, err)
	return id
}

func TestFactoryFlowMutualTLS(t *testing.T) {
	ca, roots := testCA(t)
	server, err := ca.IssueServer([]string{"127.0.0.1"})
	require.NoError(t, err)
	for _, tp := range tpms {
		t.Run(tp.name, func(t *testing.T) {
			tpm := tp.open(t)
			for _, alg := range algs {
				key, _ := newKey(t, tpm, alg)
				id := enroll(t, key, ca, "device-"+string(alg))
				require.Len(t, id.Chain, 2, "leaf and intermediate")
				cases := []struct {
					name    string
					version uint16
				}{
					{"TLS1.2", tls.VersionTLS12},
					{"TLS1.3", tls.VersionTLS13},
				}
				for _, c := range cases {
					t.Run(string(alg)+"/"+c.name, func(t *testing.T) {
						got := handshake(t, id, server, roots, c.version)
						assert.Equal(t, id.RegistrationID, got)
					})
				}
			}
		})
	}
}

// handshake runs one mutual TLS handshake on loopback at exactly version, the server
// verifying the client's chain against roots, and returns the CN the server saw.
func handshake(t *testing.T, id *attest.Identity, server *pki.Leaf, roots *x509.CertPool, version uint16) string {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		Certificates: []tls.Certificate{server.TLSCertificate()},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    roots,
		MinVersion:   version,
		MaxVersion:   version,
	})
	require.NoError(t, err)
	defer ln.Close()
	seen := make(chan string, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			seen <- err.Error()
			return
		}
		defer conn.Close()
		tc := conn.(*tls.Conn)
		if err := tc.Handshake(); err != nil {
			seen <- err.Error()
			return
		}
		seen <- tc.ConnectionState().PeerCertificates[0].Subject.CommonName
		io.Copy(io.Discard, conn)
	}()
	cert := id.TLSCertificate()
	conn, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{
		Certificates: []tls.Certificate{cert},
		RootCAs:      roots,
		ServerName:   "127.0.0.1",
		MinVersion:   version,
		MaxVersion:   version,
	})
	require.NoError(t, err)
	defer conn.Close()
	require.NoError(t, conn.Handshake())
	require.Equal(t, version, conn.ConnectionState().Version)
	return <-seen
}

func TestPersistentKey(t *testing.T) {
	const handle = 0x81000010
	for _, tp := range tpms {
		t.Run(tp.name, func(t *testing.T) {
			tpm := tp.open(t)
			k, err := attest.CreateKey(tpm, attest.ECDSAP256)
			require.NoError(t, err)
			before := transientHandles(t, tpm)
			require.NoError(t, attest.Persist(tpm, k, handle))
			assert.Equal(t, before, transientHandles(t, tpm), "Persist leaves no transient object")

			err = attest.Persist(tpm, k, handle)
			assert.ErrorIs(t, err, attest.ErrKeyExists)

			key, err := attest.LoadKey(tpm, "tpmkey:handle=0x81000010")
			require.NoError(t, err)
			digest := sha256.Sum256([]byte("persistent"))
			sig, err := key.Sign(rand.Reader, digest[:], crypto.SHA256)
			require.NoError(t, err)
			verify(t, key.Public(), digest[:], sig, crypto.SHA256)
			want, err := k.PublicKey()
			require.NoError(t, err)
			assert.True(t, want.(*ecdsa.PublicKey).Equal(key.Public()))
			require.NoError(t, key.Close())
			assert.Equal(t, before, transientHandles(t, tpm))

			// Close leaves a persistent key in place.
			key, err = attest.LoadKey(tpm, "tpmkey:handle=0x81000010")
			require.NoError(t, err)
			key.Close()
		})
	}
}

func TestWriteKeyfileRefusesToReplace(t *testing.T) {
	tpm := attesttest.Simulator(t)
	k, err := attest.CreateKey(tpm, attest.ECDSAP256)
	require.NoError(t, err)
	path := filepath.Join(t.TempDir(), "device.key")
	require.NoError(t, os.WriteFile(path, []byte("precious"), 0o600))
	err = attest.WriteKeyfile(path, k)
	assert.ErrorIs(t, err, attest.ErrKeyExists)
	b, _ := os.ReadFile(path)
	assert.Equal(t, "precious", string(b), "existing key untouched")

	fresh := filepath.Join(t.TempDir(), "fresh.key")
	require.NoError(t, attest.WriteKeyfile(fresh, k))
	fi, err := os.Stat(fresh)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
	parsed, err := keyfile.Decode(must(os.ReadFile(fresh)))
	require.NoError(t, err)
	assert.Empty(t, parsed.Description, "tpm2-openssl 1.1.1 cannot read a description")
	pub, err := parsed.Pubkey.Contents()
	require.NoError(t, err)
	a := pub.ObjectAttributes
	assert.True(t, a.FixedTPM && a.FixedParent && a.SensitiveDataOrigin && a.SignEncrypt && a.NoDA)
	assert.False(t, a.Decrypt || a.Restricted, "sign-only")
	assert.Equal(t, tpm2.TPMRHOwner, parsed.Parent)
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

func TestNoTransientHandleLeak(t *testing.T) {
	for _, tp := range tpms {
		t.Run(tp.name, func(t *testing.T) {
			tpm := tp.open(t)
			before := transientHandles(t, tpm)
			key, path := newKey(t, tpm, attest.ECDSAP256)
			assert.Equal(t, before+1, transientHandles(t, tpm), "only the key itself stays loaded")
			digest := sha256.Sum256([]byte("leak"))
			for range 1000 {
				_, err := key.Sign(rand.Reader, digest[:], crypto.SHA256)
				require.NoError(t, err)
			}
			assert.Equal(t, before+1, transientHandles(t, tpm))
			require.NoError(t, key.Close())
			assert.Equal(t, before, transientHandles(t, tpm))

			// A keyfile the TPM rejects (made on another TPM) must not leak the SRK either.
			foreign := foreignKeyfile(t, path)
			for range 5 {
				_, err := attest.LoadKey(tpm, "tpmkey:"+foreign)
				require.ErrorIs(t, err, attest.ErrInvalidKey)
			}
			assert.Equal(t, before, transientHandles(t, tpm))
		})
	}
}

// foreignKeyfile rewrites the keyfile at path with a corrupted private blob, which the TPM
// rejects as it would a key from another TPM (TPM_RC_INTEGRITY).
func foreignKeyfile(t testing.TB, path string) string {
	t.Helper()
	k, err := keyfile.Decode(must(os.ReadFile(path)))
	require.NoError(t, err)
	priv := append([]byte(nil), k.Privkey.Buffer...)
	priv[len(priv)-1] ^= 0xff
	k.Privkey.Buffer = priv
	out := filepath.Join(t.TempDir(), "foreign.key")
	require.NoError(t, attest.WriteKeyfile(out, k))
	return out
}

func TestConcurrentSign(t *testing.T) {
	for _, tp := range tpms {
		t.Run(tp.name, func(t *testing.T) {
			tpm := tp.open(t)
			key, _ := newKey(t, tpm, attest.ECDSAP256)
			var wg sync.WaitGroup
			errs := make(chan error, 8)
			for g := range 8 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := range 25 {
						digest := sha256.Sum256([]byte{byte(g), byte(i)})
						sig, err := key.Sign(rand.Reader, digest[:], crypto.SHA256)
						if err != nil {
							errs <- err
							return
						}
						if !ecdsa.VerifyASN1(key.Public().(*ecdsa.PublicKey), digest[:], sig) {
							errs <- errors.New("signature does not verify")
							return
						}
						// Other TPM traffic interleaves with the signatures.
						if _, err := (tpm2.GetRandom{BytesRequested: 8}).Execute(tpm); err != nil {
							errs <- err
							return
						}
					}
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Error(err)
			}
		})
	}
}

func TestSignRejectsBadInput(t *testing.T) {
	tpm := attesttest.Simulator(t)
	ecKey, _ := newKey(t, tpm, attest.ECDSAP256)
	rsaKey, _ := newKey(t, tpm, attest.RSA2048)
	d256 := sha256.Sum256([]byte("x"))
	d384 := sha512.Sum384([]byte("x"))
	d512 := sha512.Sum512([]byte("x"))
	for _, c := range []struct {
		name   string
		key    *attest.Key
		digest []byte
		opts   crypto.SignerOpts
		ok     bool
	}{
		{"ecdsa sha256", ecKey, d256[:], crypto.SHA256, true},
		{"ecdsa sha384", ecKey, d384[:], crypto.SHA384, true},
		{"rsa pkcs1 sha256", rsaKey, d256[:], crypto.SHA256, true},
		{"rsa pss sha256", rsaKey, d256[:], &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: crypto.SHA256}, true},
		{"digest too short", ecKey, d256[:20], crypto.SHA256, false},
		{"digest of another hash", ecKey, d384[:], crypto.SHA256, false},
		{"sha512", ecKey, d512[:], crypto.SHA512, false},
		{"rsa sha512 needs decrypt", rsaKey, d512[:], crypto.SHA512, false},
		{"no hash", ecKey, d256[:], crypto.Hash(0), false},
		{"pss on ecdsa", ecKey, d256[:], &rsa.PSSOptions{Hash: crypto.SHA256}, false},
		{"pss odd salt", rsaKey, d256[:], &rsa.PSSOptions{SaltLength: 222, Hash: crypto.SHA256}, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			sig, err := c.key.Sign(rand.Reader, c.digest, c.opts)
			if !c.ok {
				require.Error(t, err)
				return
			}
			require.NoError(t, err)
			verify(t, c.key.Public(), c.digest, sig, c.opts)
		})
	}
	require.NoError(t, ecKey.Close())
	_, err := ecKey.Sign(rand.Reader, d256[:], crypto.SHA256)
	assert.ErrorIs(t, err, attest.ErrKeyClosed)
}

func TestLoadKeyErrors(t *testing.T) {
	tpm := attesttest.Simulator(t)
	dir := t.TempDir()
	notKey := filepath.Join(dir, "not.key")
	require.NoError(t, os.WriteFile(notKey, []byte("-----BEGIN TSS2 PRIVATE KEY-----\nAAAA\n-----END TSS2 PRIVATE KEY-----\n"), 0o600))
	ecSoft, err := pki.NewKey(pki.ECDSAP256)
	require.NoError(t, err)
	softPath := filepath.Join(dir, "soft.pem")
	require.NoError(t, certcodec.WritePrivateKey(softPath, ecSoft))

	for _, c := range []struct {
		name string
		spec string
		want error
	}{
		{"empty", "", attest.ErrInvalidKey},
		{"missing keyfile", "tpmkey:" + filepath.Join(dir, "missing.key"), attest.ErrInvalidKey},
		{"not a keyfile", "tpmkey:" + notKey, attest.ErrInvalidKey},
		{"handle not persistent", "tpmkey:handle=0x80000001", attest.ErrInvalidKey},
		{"handle not a number", "tpmkey:handle=zzz", attest.ErrInvalidKey},
		{"handle empty slot", "tpmkey:handle=0x81000099", attest.ErrInvalidKey},
		{"software key missing", "file:" + filepath.Join(dir, "missing.pem"), attest.ErrInvalidKey},
		{"software key not a key", "file:" + notKey, attest.ErrInvalidKey},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := attest.LoadKey(tpm, c.spec)
			require.ErrorIs(t, err, c.want)
			t.Log(err)
		})
	}

	t.Run("software key", func(t *testing.T) {
		key, err := attest.LoadKey(nil, "file:"+softPath)
		require.NoError(t, err)
		assert.True(t, key.Software)
		assert.True(t, ecSoft.Public().(*ecdsa.PublicKey).Equal(key.Public()))
	})
	t.Run("tpm key without a TPM", func(t *testing.T) {
		_, err := attest.LoadKey(nil, "tpmkey:/var/lib/unicity/identity.key")
		assert.ErrorIs(t, err, attest.ErrNoTPM)
	})
}

func TestOpenTPMErrors(t *testing.T) {
	notDevice := filepath.Join(t.TempDir(), "tpm0")
	require.NoError(t, os.WriteFile(notDevice, nil, 0o600))
	for _, spec := range []string{
		"/nonexistent/tpmrm0",
		notDevice,
		"swtpm:",
		"swtpm:/nonexistent/swtpm.sock",
		"swtpm:127.0.0.1:1",
		"mssim:127.0.0.1:2321",
		"tpmrm0",
	} {
		t.Run(spec, func(t *testing.T) {
			_, err := attest.OpenTPM(context.Background(), spec)
			require.ErrorIs(t, err, attest.ErrNoTPM)
			t.Log(err)
		})
	}
}

// TestOpenTPMOverTCP covers swtpm:HOST:PORT, the form for an swtpm shared with tpm2-tools.
func TestOpenTPMOverTCP(t *testing.T) {
	bin := attesttest.RequireTool(t, "swtpm")
	port := freePort(t)
	p, err := attesttest.StartTCP(bin, t.TempDir(), port)
	require.NoError(t, err)
	t.Cleanup(p.Stop)
	tpm, err := attest.OpenTPM(context.Background(), "swtpm:"+p.Addr)
	require.NoError(t, err)
	defer tpm.Close()
	key, _ := newKey(t, tpm, attest.ECDSAP256)
	digest := sha256.Sum256([]byte("tcp"))
	sig, err := key.Sign(rand.Reader, digest[:], crypto.SHA256)
	require.NoError(t, err)
	verify(t, key.Public(), digest[:], sig, crypto.SHA256)
}

func freePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// TestConcurrentLoad loads, uses and closes keys from two goroutines at once. Each load
// holds a storage root key and the key: interleaved, two loads would need four of the
// TPM's three object slots.
func TestConcurrentLoad(t *testing.T) {
	tpm := attesttest.Simulator(t)
	k, err := attest.CreateKey(tpm, attest.ECDSAP256)
	require.NoError(t, err)
	path := filepath.Join(t.TempDir(), "device.key")
	require.NoError(t, attest.WriteKeyfile(path, k))
	before := transientHandles(t, tpm)
	var wg sync.WaitGroup
	errs := make(chan error, 2)
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 20 {
				key, err := attest.LoadKey(tpm, "tpmkey:"+path)
				if err != nil {
					errs <- err
					return
				}
				digest := sha256.Sum256([]byte("load"))
				_, err = key.Sign(rand.Reader, digest[:], crypto.SHA256)
				if cerr := key.Close(); err == nil {
					err = cerr
				}
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	assert.Equal(t, before, transientHandles(t, tpm))
}

// TestKeyUnderPersistentSRK loads a keyfile whose parent is a persistent storage root key at
// 0x81000001, as `openssl genpkey -provider tpm2 -pkeyopt parent:0x81000001` writes them.
func TestKeyUnderPersistentSRK(t *testing.T) {
	for _, tp := range tpms {
		t.Run(tp.name, func(t *testing.T) {
			tpm := tp.open(t)
			srk, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHOwner, InPublic: tpm2.New2B(keyfile.ECCSRK_H2_Template)}.Execute(tpm)
			require.NoError(t, err)
			_, err = tpm2.EvictControl{
				Auth:             tpm2.TPMRHOwner,
				ObjectHandle:     &tpm2.NamedHandle{Handle: srk.ObjectHandle, Name: srk.Name},
				PersistentHandle: 0x81000001,
			}.Execute(tpm)
			require.NoError(t, err)
			_, err = tpm2.FlushContext{FlushHandle: srk.ObjectHandle}.Execute(tpm)
			require.NoError(t, err)

			k, err := keyfile.NewLoadableKey(tpm, tpm2.TPMAlgECC, 256, nil, keyfile.WithParent(0x81000001))
			require.NoError(t, err)
			path := filepath.Join(t.TempDir(), "openssl-style.key")
			require.NoError(t, attest.WriteKeyfile(path, k))
			before := transientHandles(t, tpm)
			key, err := attest.LoadKey(tpm, path)
			require.NoError(t, err)
			digest := sha256.Sum256([]byte("persistent parent"))
			sig, err := key.Sign(rand.Reader, digest[:], crypto.SHA256)
			require.NoError(t, err)
			verify(t, key.Public(), digest[:], sig, crypto.SHA256)
			require.NoError(t, key.Close())
			assert.Equal(t, before, transientHandles(t, tpm))
		})
	}
}

// TestSignsDuringLockout: another program's wrong PINs put the TPM in dictionary-attack
// lockout, which stops every key without NoDA; the device key must keep signing.
func TestSignsDuringLockout(t *testing.T) {
	for _, tp := range tpms {
		t.Run(tp.name, func(t *testing.T) {
			tpm := tp.open(t)
			srk, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHOwner, InPublic: tpm2.New2B(keyfile.ECCSRK_H2_Template)}.Execute(tpm)
			require.NoError(t, err)
			parent := tpm2.AuthHandle{Handle: srk.ObjectHandle, Name: srk.Name, Auth: tpm2.PasswordAuth(nil)}
			// Another program's key, with a PIN and without NoDA.
			tmpl := tpm2.TPMTPublic{
				Type: tpm2.TPMAlgECC, NameAlg: tpm2.TPMAlgSHA256,
				ObjectAttributes: tpm2.TPMAObject{FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true, UserWithAuth: true, SignEncrypt: true},
				Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
					CurveID: tpm2.TPMECCNistP256, Scheme: tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgNull},
				}),
			}
			cr, err := tpm2.Create{
				ParentHandle: parent,
				InSensitive:  tpm2.TPM2BSensitiveCreate{Sensitive: &tpm2.TPMSSensitiveCreate{UserAuth: tpm2.TPM2BAuth{Buffer: []byte("1234")}}},
				InPublic:     tpm2.New2B(tmpl),
			}.Execute(tpm)
			require.NoError(t, err)
			lr, err := tpm2.Load{ParentHandle: parent, InPrivate: cr.OutPrivate, InPublic: cr.OutPublic}.Execute(tpm)
			require.NoError(t, err)
			digest := sha256.Sum256([]byte("lockout"))
			lockedOut := false
			for range 100 {
				_, err := tpm2.Sign{
					KeyHandle:  tpm2.AuthHandle{Handle: lr.ObjectHandle, Name: lr.Name, Auth: tpm2.PasswordAuth([]byte("0000"))},
					Digest:     tpm2.TPM2BDigest{Buffer: digest[:]},
					InScheme:   tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgECDSA, Details: tpm2.NewTPMUSigScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSchemeHash{HashAlg: tpm2.TPMAlgSHA256})},
					Validation: tpm2.TPMTTKHashCheck{Tag: tpm2.TPMSTHashCheck},
				}.Execute(tpm)
				require.Error(t, err)
				if errors.Is(err, tpm2.TPMRCLockout) {
					lockedOut = true
					break
				}
			}
			require.True(t, lockedOut, "wrong PINs never locked the TPM out")
			// The other program goes away; the lockout stays.
			for _, h := range []tpm2.TPMHandle{lr.ObjectHandle, srk.ObjectHandle} {
				_, err := tpm2.FlushContext{FlushHandle: h}.Execute(tpm)
				require.NoError(t, err)
			}

			// Created, loaded and used during the lockout.
			key, _ := newKey(t, tpm, attest.ECDSAP256)
			sig, err := key.Sign(rand.Reader, digest[:], crypto.SHA256)
			require.NoError(t, err)
			verify(t, key.Public(), digest[:], sig, crypto.SHA256)
		})
	}
}
