// Package atomicfile replaces files so that a reader, or a process killed at any point, sees
// either the old content or the new, never a mix, and a power cut after a successful write
// keeps the new. It does not lock: callers that race on one file serialize themselves.
package atomicfile

import (
	"io/fs"
	"os"
	"path/filepath"
)

// Write replaces path with data. The file gets exactly mode perm (the umask does not apply)
// before any byte is written, so a private file is never readable by others, not even
// half-written. The
// temporary file lives beside path, matching TempGlob(path), and is removed on failure.
func Write(path string, data []byte, perm fs.FileMode) (err error) {
	dir, name := filepath.Split(path)
	f, err := os.CreateTemp(dir, "."+name+".tmp-")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	if err := f.Chmod(perm); err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return Rename(f.Name(), path)
}

// TempGlob matches the temporary files Write uses for path. One that outlives its writer was
// left by a process killed mid-write; the caller that owns path may remove it.
func TempGlob(path string) string {
	dir, name := filepath.Split(path)
	return filepath.Join(dir, "."+name+".tmp-*")
}

// Rename renames oldpath to newpath and syncs the directory of newpath, so that the rename
// survives a power cut. Both must be in the same directory for that to hold.
func Rename(oldpath, newpath string) error {
	if err := os.Rename(oldpath, newpath); err != nil {
		return err
	}
	d, err := os.Open(filepath.Dir(newpath))
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
