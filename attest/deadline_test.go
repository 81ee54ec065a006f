package attest_test

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"path/filepath"
	"testing"
	"time"

	keyfile "github.com/foxboron/go-tpm-keyfiles"
	"github.com/google/go-tpm/tpm2"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/attest/attesttest"
)

// TestSilentTPM: a TPM that takes the connection and never answers fails OpenTPM with
// ErrTPMUnavailable after the command deadline, not never; and its context's end cuts the
// wait short at once, whatever the deadline.
func TestSilentTPM(t *testing.T) {
	spec := attesttest.SilentTPM(t).Spec()

	start := time.Now()
	_, err := attest.OpenTPMWithTimeout(context.Background(), spec, 300*time.Millisecond)
	require.ErrorIs(t, err, attest.ErrTPMUnavailable)
	assert.NotErrorIs(t, err, attest.ErrNoTPM)
	assert.Contains(t, err.Error(), spec+" did not answer within 300ms")
	assert.Less(t, time.Since(start), 3*time.Second)
	t.Log(err)

	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, cancel)
	start = time.Now()
	_, err = attest.OpenTPM(ctx, spec)
	require.ErrorIs(t, err, attest.ErrTPMUnavailable)
	require.ErrorIs(t, err, context.Canceled)
	assert.Less(t, time.Since(start), attest.CommandTimeout/2, "cancelled, not timed out")
	t.Log(err)
}

// TestWedgedTPMUnderAKey: a TPM that stops answering under a loaded key makes Sign fail
// within the deadline; once it answers again, the same Key signs on a new connection (which
// keeps the key loaded: it is this program's). Cancelling the TPM's context ends a wait on a
// wedged TPM at once, and leaves only flushes possible.
func TestWedgedTPMUnderAKey(t *testing.T) {
	p := attesttest.Wedge(t, attesttest.StartSWTPM(t))
	spec := p.Spec()
	digest := sha256.Sum256([]byte("wedged"))

	t.Run("deadline", func(t *testing.T) {
		tpm, err := attest.OpenTPMWithTimeout(context.Background(), spec, 300*time.Millisecond)
		require.NoError(t, err)
		defer tpm.Close()
		key, _ := newKey(t, tpm, attest.ECDSAP256)
		before := transientHandles(t, tpm)

		p.Wedged.Store(true)
		start := time.Now()
		_, err = key.Sign(rand.Reader, digest[:], crypto.SHA256)
		require.Error(t, err)
		assert.Contains(t, err.Error(), "did not answer within 300ms")
		assert.Less(t, time.Since(start), 3*time.Second)
		t.Log(err)

		p.Wedged.Store(false)
		sig, err := key.Sign(rand.Reader, digest[:], crypto.SHA256)
		require.NoError(t, err)
		verify(t, key.Public(), digest[:], sig, crypto.SHA256)
		assert.Equal(t, before, transientHandles(t, tpm), "the key stayed loaded, nothing else is")
	})

	t.Run("cancel", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		tpm, err := attest.OpenTPM(ctx, spec)
		require.NoError(t, err)
		defer tpm.Close()
		key, _ := newKey(t, tpm, attest.ECDSAP256)

		p.Wedged.Store(true)
		time.AfterFunc(100*time.Millisecond, cancel)
		start := time.Now()
		_, err = key.Sign(rand.Reader, digest[:], crypto.SHA256)
		require.Error(t, err)
		assert.Less(t, time.Since(start), attest.CommandTimeout/2, "cancelled, not timed out")
		t.Log(err)
		p.Wedged.Store(false)

		_, err = tpm2.GetCapability{Capability: tpm2.TPMCapHandles, Property: 0x80000000, PropertyCount: 1}.Execute(tpm)
		require.ErrorIs(t, err, attest.ErrTPMUnavailable, "after the end of its context, the TPM runs no command but flushes")
		require.ErrorIs(t, err, context.Canceled)
	})
}

// loadedSessions counts the sessions loaded in the TPM.
func loadedSessions(t testing.TB, tpm *attest.TPM) int {
	t.Helper()
	return countHandles(t, tpm, 0x02000000)
}

// fillObjectSlots creates storage root keys in tpm until it is out of object memory, and
// returns how many it made. None is flushed: a program killed while holding objects leaves
// them so in a TPM without a resource manager.
func fillObjectSlots(t testing.TB, tpm *attest.TPM) int {
	t.Helper()
	n := 0
	for {
		_, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHOwner, InPublic: tpm2.New2B(keyfile.ECCSRK_H2_Template)}.Execute(tpm)
		if err != nil {
			require.ErrorIs(t, err, tpm2.TPMRCObjectMemory)
			return n
		}
		n++
	}
}

// TestReclaimOnExclusiveTPM: swtpm, like /dev/tpm0, has no resource manager. What programs
// that are gone left in it (objects, a session) is flushed when it is opened; a key that does
// not load for lack of slots gets the slots no Key of this program holds.
func TestReclaimOnExclusiveTPM(t *testing.T) {
	spec := "swtpm:" + attesttest.StartSWTPM(t)
	dead, err := attest.OpenTPM(context.Background(), spec)
	require.NoError(t, err)
	kf, err := attest.CreateKey(dead, attest.ECDSAP256)
	require.NoError(t, err)
	path := filepath.Join(t.TempDir(), "device.key")
	require.NoError(t, attest.WriteKeyfile(path, kf))
	_, err = tpm2.StartAuthSession{TPMKey: tpm2.TPMRHNull, Bind: tpm2.TPMRHNull, SessionType: tpm2.TPMSEHMAC,
		Symmetric: tpm2.TPMTSymDef{Algorithm: tpm2.TPMAlgNull}, AuthHash: tpm2.TPMAlgSHA256,
		NonceCaller: tpm2.TPM2BNonce{Buffer: make([]byte, 16)}}.Execute(dead)
	require.NoError(t, err)
	left := fillObjectSlots(t, dead)
	require.Positive(t, left)
	require.NoError(t, dead.Close())

	tpm, err := attest.OpenTPM(context.Background(), spec)
	require.NoError(t, err)
	defer tpm.Close()
	assert.Zero(t, transientHandles(t, tpm), "the %d objects left behind are flushed", left)
	assert.Zero(t, loadedSessions(t, tpm), "the session left behind is flushed")

	first, err := attest.LoadKey(tpm, "tpmkey:"+path)
	require.NoError(t, err)
	defer first.Close()
	require.Positive(t, fillObjectSlots(t, tpm))
	second, err := attest.LoadKey(tpm, "tpmkey:"+path)
	require.NoError(t, err, "out of memory: what no Key holds is flushed")
	defer second.Close()
	digest := sha256.Sum256([]byte("reclaimed"))
	for _, k := range []*attest.Key{first, second} {
		sig, err := k.Sign(rand.Reader, digest[:], crypto.SHA256)
		require.NoError(t, err, "both keys stay loaded")
		verify(t, k.Public(), digest[:], sig, crypto.SHA256)
	}
	assert.Equal(t, 2, transientHandles(t, tpm))
}

func TestExclusive(t *testing.T) {
	for spec, want := range map[string]bool{
		"":                      false,
		"/dev/tpmrm0":           false,
		"/dev/tpmrm1":           false,
		"/dev/tpm0":             true,
		"swtpm:/run/swtpm.sock": true,
		"swtpm:127.0.0.1:2321":  true,
	} {
		assert.Equal(t, want, attest.Exclusive(spec), spec)
	}
}
