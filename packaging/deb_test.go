package packaging_test

import (
	"debug/elf"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/attest/attesttest"
)

// TestDebianPackage builds the package with `make deb` and installs it with dpkg into a
// scratch root the way image builders do (chrootless: the maintainer scripts run with
// DPKG_ROOT), then checks what a gateway gets: files, modes, owners, the service user, the
// enabled unit, and what upgrades, removal and purge keep.
func TestDebianPackage(t *testing.T) {
	for _, tool := range []string{"make", "dpkg", "dpkg-deb", "dpkg-query", "systemd-sysusers", "systemd-tmpfiles", "systemctl", "systemd-analyze"} {
		attesttest.RequireTool(t, tool)
	}
	requireRoot(t)

	dist := t.TempDir()
	run(t, "make", "-C", "..", "--no-print-directory", "deb", "DIST="+dist)
	debs, err := filepath.Glob(filepath.Join(dist, "unicity_*.deb"))
	require.NoError(t, err)
	require.Len(t, debs, 1)
	deb := debs[0]

	t.Run("control", func(t *testing.T) {
		ctrl := t.TempDir()
		run(t, "dpkg-deb", "--control", deb, ctrl)
		fields := run(t, "dpkg-deb", "--field", deb, "Package", "Architecture", "Recommends")
		assert.Contains(t, fields, "Package: unicity\n")
		assert.Contains(t, fields, "Architecture: "+debArch()+"\n")
		assert.Contains(t, fields, "Recommends: tpm-udev\n")
		conffiles, err := os.ReadFile(filepath.Join(ctrl, "conffiles"))
		require.NoError(t, err)
		assert.Equal(t, []string{"/etc/unicity/config.toml"}, strings.Fields(string(conffiles)))
		for _, script := range []string{"postinst", "prerm", "postrm"} {
			assertOwnerMode(t, filepath.Join(ctrl, script), 0, 0, 0o755)
		}
	})

	root := scratchRootWithSystemUnits(t)
	for _, dir := range []string{"var/lib/dpkg/info", "var/lib/dpkg/updates", "var/log", "etc"} {
		require.NoError(t, os.MkdirAll(filepath.Join(root, dir), 0o755))
	}
	require.NoError(t, os.WriteFile(filepath.Join(root, "var/lib/dpkg/status"), nil, 0o644))
	dpkg := func(args ...string) string {
		return run(t, "dpkg", append([]string{"--root=" + root, "--force-script-chrootless"}, args...)...)
	}
	at := func(p string) string { return filepath.Join(root, p) }
	const (
		config   = "etc/unicity/config.toml"
		wantsDir = "etc/systemd/system/multi-user.target.wants"
		enabled  = wantsDir + "/unicity.service"
		stateDir = "var/lib/unicity"
	)

	dpkg("--install", deb)
	uid, gid := checkServiceUser(t, root)

	t.Run("installed", func(t *testing.T) {
		assert.Equal(t, "install ok installed", run(t, "dpkg-query", "--root="+root, "--show", "--showformat=${Status}", "unicity"))
		files := []struct {
			path     string
			mode     os.FileMode
			uid, gid int
		}{
			{"usr/bin/unicity", 0o755, 0, 0},
			{"usr/lib/systemd/system/unicity.service", 0o644, 0, 0},
			{"usr/lib/sysusers.d/unicity.conf", 0o644, 0, 0},
			{"usr/lib/tmpfiles.d/unicity.conf", 0o644, 0, 0},
			{"etc/unicity", os.ModeDir | 0o755, 0, 0},
			{config, 0o644, 0, 0},
			{stateDir, os.ModeDir | 0o700, uid, gid},
		}
		for _, f := range files {
			assertOwnerMode(t, at(f.path), f.uid, f.gid, f.mode)
		}
		for src, dst := range map[string]string{
			"systemd/unicity.service":  "usr/lib/systemd/system/unicity.service",
			"systemd/unicity.sysusers": "usr/lib/sysusers.d/unicity.conf",
			"systemd/unicity.tmpfiles": "usr/lib/tmpfiles.d/unicity.conf",
			"config.toml":              config,
		} {
			assertSameContent(t, src, at(dst))
		}
	})
	t.Run("enabled, not started", func(t *testing.T) {
		target, err := os.Readlink(at(enabled))
		require.NoError(t, err)
		assert.Equal(t, "/usr/lib/systemd/system/unicity.service", target)
	})
	t.Run("static agent", func(t *testing.T) {
		assertStatic(t, at("usr/bin/unicity"))
		out := run(t, at("usr/bin/unicity"), "version")
		assert.Contains(t, out, "unicity")
	})
	t.Run("unit verifies as installed", func(t *testing.T) {
		out := run(t, "systemd-analyze", "verify", "--no-pager", "--root="+root, "unicity.service")
		assert.Empty(t, strings.TrimSpace(out))
	})

	// An administrator edits the configuration and disables the service; an upgrade (here a
	// reinstallation, which runs the same scripts) keeps both.
	edited := append(readFile(t, at(config)), "# edited on this gateway\n"...)
	require.NoError(t, os.WriteFile(at(config), edited, 0o644))
	require.NoError(t, os.Remove(at(enabled)))
	dpkg("--install", deb)
	t.Run("upgrade keeps the administrator's choices", func(t *testing.T) {
		assert.Equal(t, string(edited), string(readFile(t, at(config))))
		assert.NoFileExists(t, at(enabled))
	})

	require.NoError(t, os.Symlink("/usr/lib/systemd/system/unicity.service", at(enabled)))
	identity := at(stateDir + "/identity.pem")
	require.NoError(t, os.WriteFile(identity, []byte("factory-installed"), 0o600))
	dpkg("--remove", "unicity")
	t.Run("remove", func(t *testing.T) {
		assert.NoFileExists(t, at("usr/bin/unicity"))
		assert.NoFileExists(t, at("usr/lib/systemd/system/unicity.service"))
		assert.FileExists(t, at(config), "a conffile stays until purge")
		assert.FileExists(t, identity, "the identity is the factory's, not the package's")
	})
	dpkg("--purge", "unicity")
	t.Run("purge", func(t *testing.T) {
		assert.NoFileExists(t, at(config))
		assert.NoFileExists(t, at(enabled))
		assert.FileExists(t, identity, "the identity is the factory's, not the package's")
		checkServiceUser(t, root)
	})
}

// debArch is Debian's name for the architecture `make deb` builds for by default.
func debArch() string {
	if runtime.GOARCH == "arm" {
		return "armhf"
	}
	return runtime.GOARCH
}

// assertStatic checks that an executable needs no dynamic loader nor shared library, so it
// runs on any gateway libc (or none).
func assertStatic(t *testing.T, path string) {
	t.Helper()
	f, err := elf.Open(path)
	require.NoError(t, err)
	defer f.Close()
	for _, p := range f.Progs {
		assert.NotEqual(t, elf.PT_INTERP, p.Type, "%s asks for a dynamic loader", path)
	}
	libs, err := f.ImportedLibraries()
	require.NoError(t, err)
	assert.Empty(t, libs, "%s needs shared libraries", path)
}

func assertSameContent(t *testing.T, want, got string) {
	t.Helper()
	assert.Equal(t, string(readFile(t, want)), string(readFile(t, got)), "%s differs from %s", got, want)
}

// TestMaintainerScriptShellcheck holds the maintainer script to shellcheck as POSIX sh: it runs
// under dash on Debian and in image builders' chroots.
func TestMaintainerScriptShellcheck(t *testing.T) {
	shellcheck := attesttest.RequireTool(t, "shellcheck")
	out, err := exec.Command(shellcheck, "--shell=sh", "deb/maintscript").CombinedOutput()
	assert.NoError(t, err, "%s", out)
}
