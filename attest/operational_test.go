package attest_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/attest/attesttest"
	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/internal/pki"
)

// issue runs the factory flow for key and returns the chain as DPS or the hub would: DER,
// leaf first, up to the root.
func issue(t testing.TB, ca *pki.CA, key *attest.Key, regID string) [][]byte {
	t.Helper()
	var ders [][]byte
	for _, c := range append(enroll(t, key, ca, regID).Chain, ca.Root()) {
		ders = append(ders, c.Raw)
	}
	return ders
}

func TestOperationalKey(t *testing.T) {
	ca, roots := testCA(t)
	server, err := ca.IssueServer([]string{"127.0.0.1"})
	require.NoError(t, err)
	for _, tp := range tpms {
		t.Run(tp.name, func(t *testing.T) {
			tpm := tp.open(t)
			for _, alg := range []attest.KeyAlgorithm{"", attest.ECDSAP256, attest.ECDSAP384} {
				t.Run("alg="+string(alg), func(t *testing.T) {
					before := transientHandles(t, tpm)
					path := filepath.Join(t.TempDir(), "operational.key")
					key, err := attest.NewOperationalKey(tpm, alg, path)
					require.NoError(t, err)
					fi, err := os.Stat(path)
					require.NoError(t, err)
					assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
					assert.Equal(t, "tpmkey:"+path, key.Location)
					assert.Equal(t, before+1, transientHandles(t, tpm), "only the key stays loaded")

					id, err := attest.IssuedIdentity(issue(t, ca, key, "gw-op-1"), key, time.Now())
					require.NoError(t, err)
					require.Len(t, id.Chain, 3, "leaf, issuing CA, root")
					for _, v := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
						assert.Equal(t, "gw-op-1", handshake(t, id, server, roots, v))
					}

					require.NoError(t, key.Destroy())
					assert.NoFileExists(t, path)
					assert.Equal(t, before, transientHandles(t, tpm), "Destroy flushes the loaded key")
					require.NoError(t, attest.DestroyKey(tpm, "tpmkey:"+path), "destroying again is a no-op")
					_, err = attest.LoadKey(tpm, "tpmkey:"+path)
					assert.ErrorIs(t, err, attest.ErrInvalidKey, "the key is gone")
				})
			}
		})
	}
}

func TestOperationalKeyCurve(t *testing.T) {
	tpm := tpms[0].open(t)
	path := filepath.Join(t.TempDir(), "p384.key")
	key, err := attest.NewOperationalKey(tpm, attest.ECDSAP384, path)
	require.NoError(t, err)
	defer key.Destroy()
	der, err := attest.CreateCSR(key, "gw-p384")
	require.NoError(t, err)
	csr, err := x509.ParseCertificateRequest(der)
	require.NoError(t, err)
	require.NoError(t, csr.CheckSignature())
	assert.Equal(t, x509.ECDSAWithSHA384, csr.SignatureAlgorithm, "a P-384 key signs with SHA-384")
}

// Renewal makes a key per certificate: a hundred of them, made and destroyed, leave the TPM
// and the directory as they were.
func TestOperationalKeyCycles(t *testing.T) {
	ca, _ := testCA(t)
	for _, tp := range tpms {
		t.Run(tp.name, func(t *testing.T) {
			tpm := tp.open(t)
			dir := t.TempDir()
			transient, persistent := transientHandles(t, tpm), persistentHandles(t, tpm)
			prev, err := attest.NewOperationalKey(tpm, "", filepath.Join(dir, "op-0.key"))
			require.NoError(t, err)
			for i := 1; i <= 100; i++ {
				next, err := attest.NewOperationalKey(tpm, "", filepath.Join(dir, fmt.Sprintf("op-%d.key", i)))
				require.NoError(t, err, "cycle %d", i)
				_, err = attest.IssuedIdentity(issue(t, ca, next, "gw-cycle"), next, time.Now())
				require.NoError(t, err)
				require.Equal(t, transient+2, transientHandles(t, tpm), "cycle %d: the old key and the new one", i)
				require.NoError(t, prev.Destroy(), "cycle %d", i)
				prev = next
			}
			require.NoError(t, prev.Destroy())
			assert.Equal(t, transient, transientHandles(t, tpm))
			assert.Equal(t, persistent, persistentHandles(t, tpm))
			left, err := os.ReadDir(dir)
			require.NoError(t, err)
			assert.Empty(t, left, "no keyfile left behind")
		})
	}
}

// persistentHandles counts the objects persisted in the TPM.
func persistentHandles(t testing.TB, tpm transport.TPM) int {
	t.Helper()
	r, err := tpm2.GetCapability{Capability: tpm2.TPMCapHandles, Property: 0x81000000, PropertyCount: 64}.Execute(tpm)
	require.NoError(t, err)
	h, err := r.CapabilityData.Data.Handles()
	require.NoError(t, err)
	return len(h.Handle)
}

func TestDestroyPersistentKey(t *testing.T) {
	const handle = 0x81000020
	for _, tp := range tpms {
		t.Run(tp.name, func(t *testing.T) {
			tpm := tp.open(t)
			before, transient := persistentHandles(t, tpm), transientHandles(t, tpm)
			k, err := attest.CreateKey(tpm, attest.ECDSAP256)
			require.NoError(t, err)
			require.NoError(t, attest.Persist(tpm, k, handle))
			assert.Equal(t, before+1, persistentHandles(t, tpm))
			key, err := attest.LoadKey(tpm, "tpmkey:handle=0x81000020")
			require.NoError(t, err)

			require.NoError(t, key.Destroy())
			assert.Equal(t, before, persistentHandles(t, tpm), "evicted")
			assert.Equal(t, transient, transientHandles(t, tpm))
			_, err = attest.LoadKey(tpm, "tpmkey:handle=0x81000020")
			assert.ErrorIs(t, err, attest.ErrInvalidKey)
			require.NoError(t, attest.DestroyKey(tpm, "tpmkey:handle=0x81000020"), "destroying again is a no-op")
		})
	}
}

func TestOperationalKeyRefusals(t *testing.T) {
	tpm := tpms[0].open(t)
	dir := t.TempDir()

	_, err := attest.NewOperationalKey(tpm, attest.RSA2048, filepath.Join(dir, "rsa.key"))
	assert.ErrorIs(t, err, attest.ErrInvalidKey, "RSA is not issued")
	assert.NoFileExists(t, filepath.Join(dir, "rsa.key"))

	taken := filepath.Join(dir, "taken.key")
	require.NoError(t, os.WriteFile(taken, []byte("precious"), 0o600))
	transient := transientHandles(t, tpm)
	_, err = attest.NewOperationalKey(tpm, "", taken)
	assert.ErrorIs(t, err, attest.ErrKeyExists)
	assert.Equal(t, "precious", string(must(os.ReadFile(taken))))
	assert.Equal(t, transient, transientHandles(t, tpm), "nothing left loaded")

	err = attest.DestroyKey(tpm, "tpmkey:"+taken)
	assert.ErrorIs(t, err, attest.ErrInvalidKey, "not a keyfile: left alone")
	assert.FileExists(t, taken)
	assert.ErrorIs(t, attest.DestroyKey(tpm, "file:"+taken), attest.ErrInvalidKey)
	assert.ErrorIs(t, attest.DestroyKey(tpm, "tpmkey:handle=0x01000000"), attest.ErrInvalidKey)

	soft, err := pki.NewKey(pki.ECDSAP256)
	require.NoError(t, err)
	softPath := filepath.Join(dir, "soft.pem")
	pem, err := certcodec.EncodePrivateKey(soft)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(softPath, pem, 0o600))
	sk, err := attest.LoadKey(nil, "file:"+softPath)
	require.NoError(t, err)
	assert.ErrorIs(t, sk.Destroy(), attest.ErrInvalidKey)
	assert.FileExists(t, softPath)
}

func TestIssuedIdentityRefusals(t *testing.T) {
	tpm := tpms[0].open(t)
	ca, _ := testCA(t)
	dir := t.TempDir()
	key, err := attest.NewOperationalKey(tpm, "", filepath.Join(dir, "a.key"))
	require.NoError(t, err)
	defer key.Destroy()
	other, err := attest.NewOperationalKey(tpm, "", filepath.Join(dir, "b.key"))
	require.NoError(t, err)
	defer other.Destroy()

	chain := issue(t, ca, other, "gw-x")
	_, err = attest.IssuedIdentity(chain, key, time.Now())
	assert.ErrorIs(t, err, attest.ErrKeyMismatch, "issued for another key")

	_, err = attest.IssuedIdentity([][]byte{[]byte("not DER")}, key, time.Now())
	assert.ErrorIs(t, err, attest.ErrInvalidIdentity)
	_, err = attest.IssuedIdentity(nil, key, time.Now())
	assert.ErrorIs(t, err, attest.ErrInvalidIdentity)
}

// swtpm holds 3 objects. The agent holds its onboarding and operational keys when it makes
// the next operational key, which needs the storage root key beside them: idle keyfile keys
// are flushed to make room, and load again when they sign (never with a handle another key
// has taken since).
func TestKeysBeyondTheTPMsSlots(t *testing.T) {
	tpm := attesttest.SWTPM(t)
	dir := t.TempDir()
	var keys []*attest.Key
	for i := range 5 {
		key, err := attest.NewOperationalKey(tpm, attest.ECDSAP256, filepath.Join(dir, fmt.Sprintf("op-%d.key", i)))
		require.NoError(t, err, "key %d", i)
		t.Cleanup(func() { key.Close() })
		keys = append(keys, key)
	}
	var wg sync.WaitGroup
	for round := range 3 {
		for i, key := range keys {
			wg.Go(func() {
				digest := sha256.Sum256(fmt.Appendf(nil, "round %d key %d", round, i))
				sig, err := key.Sign(rand.Reader, digest[:], crypto.SHA256)
				if assert.NoError(t, err, "key %d", i) {
					assert.True(t, ecdsa.VerifyASN1(key.Public().(*ecdsa.PublicKey), digest[:], sig), "key %d signed with its own key", i)
				}
			})
		}
	}
	wg.Wait()
	for _, key := range keys {
		require.NoError(t, key.Close())
	}
	assert.Zero(t, transientHandles(t, tpm), "closed keys leave nothing loaded")
}
