package attest_test

import (
	"context"
	"encoding/binary"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/attest/attesttest"
)

// failingTPM passes commands to a real TPM, except the first one with code cc: it answers
// that one with rc, or, when rc is zero, fails it as a broken connection does.
type failingTPM struct {
	transport.TPMCloser
	cc     tpm2.TPMCC
	rc     tpm2.TPMRC
	failed bool
}

func (f *failingTPM) Send(cmd []byte) ([]byte, error) {
	if f.failed || tpm2.TPMCC(binary.BigEndian.Uint32(cmd[6:10])) != f.cc {
		return f.TPMCloser.Send(cmd)
	}
	f.failed = true
	if f.rc == 0 {
		return nil, syscall.EPIPE
	}
	rsp := make([]byte, 10)
	binary.BigEndian.PutUint16(rsp, uint16(tpm2.TPMSTNoSessions))
	binary.BigEndian.PutUint32(rsp[2:], 10)
	binary.BigEndian.PutUint32(rsp[6:], uint32(f.rc))
	return rsp, nil
}

// TestBusyTPMIsNotAnInvalidKey: a TPM that answers "later" (busy, self-testing, locked out)
// or stops answering at any step of loading the identity is unavailable, which the agent
// waits out, and keeps the TPM's response code; only a TPM that refuses the key or
// certificate makes them invalid, which stops the agent for a person to fix.
func TestBusyTPMIsNotAnInvalidKey(t *testing.T) {
	tpm := attesttest.Simulator(t)
	kf, err := attest.CreateKey(tpm, attest.ECDSAP256)
	require.NoError(t, err)
	dir := t.TempDir()
	keyPath := filepath.Join(dir, "identity.key")
	require.NoError(t, attest.WriteKeyfile(keyPath, kf))
	const handle = 0x81000077
	require.NoError(t, attest.Persist(tpm, kf, handle))
	ca, _ := testCA(t)
	key, err := attest.LoadKey(tpm, "tpmkey:"+keyPath)
	require.NoError(t, err)
	chain := enroll(t, key, ca, "busy-tpm").Chain
	require.NoError(t, key.Close())
	require.NoError(t, attest.WriteChainNV(tpm, 0x01c00077, chain))

	loadKeyfile := func(tpm transport.TPMCloser) error {
		k, err := attest.LoadKey(tpm, "tpmkey:"+keyPath)
		if err == nil {
			k.Close()
		}
		return err
	}
	loadHandle := func(tpm transport.TPMCloser) error {
		_, err := attest.LoadKey(tpm, "tpmkey:handle=0x81000077")
		return err
	}
	loadNV := func(tpm transport.TPMCloser) error {
		_, err := attest.LoadChain(tpm, "tpm-nv:0x01c00077")
		return err
	}
	for _, c := range []struct {
		name string
		load func(transport.TPMCloser) error
		cc   tpm2.TPMCC
		rc   tpm2.TPMRC // zero: the connection breaks
	}{
		{"srk: retry", loadKeyfile, tpm2.TPMCCCreatePrimary, tpm2.TPMRCRetry},
		{"srk: yielded", loadKeyfile, tpm2.TPMCCCreatePrimary, tpm2.TPMRCYielded},
		{"srk: self-test running", loadKeyfile, tpm2.TPMCCCreatePrimary, tpm2.TPMRCTesting},
		{"srk: lockout", loadKeyfile, tpm2.TPMCCCreatePrimary, tpm2.TPMRCLockout},
		{"srk: not started", loadKeyfile, tpm2.TPMCCCreatePrimary, tpm2.TPMRCInitialize},
		{"srk: connection broken", loadKeyfile, tpm2.TPMCCCreatePrimary, 0},
		{"session: connection broken", loadKeyfile, tpm2.TPMCCStartAuthSession, 0},
		{"load: retry", loadKeyfile, tpm2.TPMCCLoad, tpm2.TPMRCRetry},
		{"load: out of object memory", loadKeyfile, tpm2.TPMCCLoad, tpm2.TPMRCObjectMemory},
		{"load: connection broken", loadKeyfile, tpm2.TPMCCLoad, 0},
		{"persistent key: self-test running", loadHandle, tpm2.TPMCCReadPublic, tpm2.TPMRCTesting},
		{"persistent key: connection broken", loadHandle, tpm2.TPMCCReadPublic, 0},
		{"nv certificate: yielded", loadNV, tpm2.TPMCCNVReadPublic, tpm2.TPMRCYielded},
		{"nv certificate: connection broken", loadNV, tpm2.TPMCCNVRead, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			before := transientHandles(t, tpm)
			err := c.load(&failingTPM{TPMCloser: tpm, cc: c.cc, rc: c.rc})
			require.Error(t, err)
			t.Log(err)
			assert.ErrorIs(t, err, attest.ErrTPMUnavailable)
			assert.NotErrorIs(t, err, attest.ErrInvalidKey)
			assert.NotErrorIs(t, err, attest.ErrInvalidIdentity)
			if c.rc != 0 {
				assert.ErrorIs(t, err, c.rc, "the TPM's response code is kept")
			} else {
				assert.ErrorIs(t, err, syscall.EPIPE, "the transport's error is kept")
			}
			assert.Equal(t, before, transientHandles(t, tpm), "nothing left loaded")
			require.NoError(t, c.load(tpm), "the same TPM, answering, loads it")
		})
	}
}

// TestUnreachableOrForeignTPM: on a real swtpm, a TPM that went away is unavailable, and a
// keyfile made on another TPM stays an invalid key.
func TestUnreachableOrForeignTPM(t *testing.T) {
	bin := attesttest.RequireTool(t, "swtpm")
	dir, err := os.MkdirTemp("", "swtpm") // a socket path must stay under 108 bytes
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	p, err := attesttest.Start(bin, dir)
	require.NoError(t, err)
	t.Cleanup(p.Stop)
	tpm, err := attest.OpenTPM(context.Background(), "swtpm:"+p.Addr)
	require.NoError(t, err)
	defer tpm.Close()
	kf, err := attest.CreateKey(tpm, attest.ECDSAP256)
	require.NoError(t, err)
	path := filepath.Join(t.TempDir(), "identity.key")
	require.NoError(t, attest.WriteKeyfile(path, kf))

	t.Run("keyfile of another TPM", func(t *testing.T) {
		_, err := attest.LoadKey(attesttest.Simulator(t), "tpmkey:"+path)
		require.Error(t, err)
		t.Log(err)
		assert.ErrorIs(t, err, attest.ErrInvalidKey)
		assert.NotErrorIs(t, err, attest.ErrTPMUnavailable)
	})
	t.Run("swtpm stopped", func(t *testing.T) {
		p.Stop()
		for _, spec := range []string{"tpmkey:" + path, "tpmkey:handle=0x81000001"} {
			_, err := attest.LoadKey(tpm, spec)
			require.Error(t, err)
			t.Log(err)
			assert.ErrorIs(t, err, attest.ErrTPMUnavailable, spec)
			assert.NotErrorIs(t, err, attest.ErrInvalidKey, spec)
		}
	})
}
