package attest_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/attest/attesttest"
)

// TestKeySurvivesSWTPMRestart: swtpm killed and started again on the same state is a TPM
// reset under a running agent. While it is down, Sign fails and says so; once it is back,
// the same Key signs again (the connection is dialled again and the keyfile reloaded), so
// the agent recovers without a restart.
func TestKeySurvivesSWTPMRestart(t *testing.T) {
	bin := attesttest.RequireTool(t, "swtpm")
	dir, err := os.MkdirTemp("", "swtpm") // a socket path must stay under 108 bytes
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	p, err := attesttest.Start(bin, dir)
	require.NoError(t, err)
	t.Cleanup(func() { p.Stop() })

	tpm, err := attest.OpenTPM(context.Background(), "swtpm:"+p.Addr)
	require.NoError(t, err)
	defer tpm.Close()
	kf, err := attest.CreateKey(tpm, attest.ECDSAP256)
	require.NoError(t, err)
	path := filepath.Join(t.TempDir(), "identity.key")
	require.NoError(t, attest.WriteKeyfile(path, kf))
	key, err := attest.LoadKey(tpm, "tpmkey:"+path)
	require.NoError(t, err)
	defer key.Close()

	digest := sha256.Sum256([]byte("hello"))
	sign := func() error {
		sig, err := key.Sign(rand.Reader, digest[:], crypto.SHA256)
		if err == nil {
			assert.True(t, ecdsa.VerifyASN1(key.Public().(*ecdsa.PublicKey), digest[:], sig))
		}
		return err
	}
	require.NoError(t, sign())

	p.Stop()
	err = sign()
	require.Error(t, err, "no TPM, no signature")
	assert.Contains(t, err.Error(), "cannot sign with tpmkey:"+path)

	p, err = attesttest.Start(bin, dir)
	require.NoError(t, err)
	for i := range 3 {
		require.NoError(t, sign(), "signature %d after the restart", i+1)
	}
}
