package atomicfile

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestWriteReplacesWithTheGivenMode(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.json")
	require.NoError(t, os.WriteFile(path, []byte("old, and longer than the new content"), 0o644))

	require.NoError(t, Write(path, []byte("new"), 0o640))

	got, err := os.ReadFile(path)
	require.NoError(t, err)
	assert.Equal(t, "new", string(got))
	fi, err := os.Stat(path)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o640), fi.Mode().Perm(), "exactly the mode asked for, whatever the umask")
	leftovers, err := filepath.Glob(TempGlob(path))
	require.NoError(t, err)
	assert.Empty(t, leftovers)
}

func TestWriteCreates(t *testing.T) {
	path := filepath.Join(t.TempDir(), "cert.pem")
	require.NoError(t, Write(path, []byte("public"), 0o644))
	got, err := os.ReadFile(path)
	require.NoError(t, err)
	assert.Equal(t, "public", string(got))
}

// A failed replacement leaves what was there and no temporary file.
func TestWriteFailureLeavesTheOldAndNoTemporaryFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "taken")
	require.NoError(t, os.Mkdir(path, 0o700))
	require.NoError(t, os.WriteFile(filepath.Join(path, "inside"), []byte("kept"), 0o600))

	require.Error(t, Write(path, []byte("new"), 0o600), "a file cannot replace a directory")

	got, err := os.ReadFile(filepath.Join(path, "inside"))
	require.NoError(t, err)
	assert.Equal(t, "kept", string(got))
	leftovers, err := filepath.Glob(TempGlob(path))
	require.NoError(t, err)
	assert.Empty(t, leftovers)
}

func TestWriteIntoMissingDirectoryFails(t *testing.T) {
	err := Write(filepath.Join(t.TempDir(), "missing", "f"), []byte("x"), 0o600)
	assert.ErrorIs(t, err, os.ErrNotExist)
}

func TestTempGlobMatchesWhatWriteUses(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.json")
	assert.Equal(t, filepath.Join(filepath.Dir(path), ".state.json.tmp-*"), TempGlob(path))
	match, err := filepath.Match(TempGlob(path), filepath.Join(filepath.Dir(path), ".state.json.tmp-123"))
	require.NoError(t, err)
	assert.True(t, match)
}

func TestRename(t *testing.T) {
	dir := t.TempDir()
	from, to := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	require.NoError(t, os.WriteFile(from, []byte("moved"), 0o600))
	require.NoError(t, Rename(from, to))
	got, err := os.ReadFile(to)
	require.NoError(t, err)
	assert.Equal(t, "moved", string(got))
	_, err = os.Stat(from)
	assert.ErrorIs(t, err, os.ErrNotExist)
	assert.ErrorIs(t, Rename(from, to), os.ErrNotExist)
}
