package attest_test

import (
	"context"
	"io/fs"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/internal/pki"
)

func TestOpenerOpensNoTPMForFiles(t *testing.T) {
	ca, err := pki.NewRoot("factory CA")
	require.NoError(t, err)
	key, err := pki.NewKey(pki.ECDSAP256)
	require.NoError(t, err)
	other, err := pki.NewKey(pki.ECDSAP256)
	require.NoError(t, err)
	leaf, err := ca.IssueDevice("gw-0001", key.Public())
	require.NoError(t, err)
	dir := t.TempDir()
	keyPath, chainPath := filepath.Join(dir, "key.pem"), filepath.Join(dir, "chain.pem")
	require.NoError(t, certcodec.WritePrivateKey(keyPath, key))
	require.NoError(t, certcodec.WriteCertificates(chainPath, leaf.Chain...))

	// A TPM that does not exist: opening it would fail.
	o := attest.NewOpener(context.Background(), "swtpm:"+filepath.Join(dir, "no-such-socket"))
	defer o.Close()
	chain, err := o.LoadChain(chainPath)
	require.NoError(t, err)
	k, err := o.LoadKey("file:" + keyPath)
	require.NoError(t, err)
	defer k.Close()
	assert.True(t, k.Software)
	require.NoError(t, attest.ProveKey(k, chain[0]))
	assert.ErrorIs(t, attest.ProveKey(other, chain[0]), attest.ErrKeyMismatch)

	_, err = o.LoadKey("tpmkey:handle=0x81000002")
	require.ErrorIs(t, err, attest.ErrNoTPM, "a TPM key opens the TPM")
	assert.ErrorIs(t, err, fs.ErrNotExist)
	_, again := o.TPM()
	assert.Same(t, err, again, "a TPM that failed to open is not tried again")
}
