// Package packaging_test checks what OEM images get, with the tools that will handle it: the
// systemd unit (its contract with the agent, and its hardening through systemd-analyze), the
// sysusers.d and tmpfiles.d entries and the shipped configuration (here), the Debian package
// installed into a scratch root (deb_test.go), the Yocto and Buildroot recipes against the
// Makefile (recipes_test.go), and the guides' walkthrough on swtpm and the emulator
// (walkthrough_test.go).
package packaging_test

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/attest/attesttest"
	"github.com/unicity-iot/unicity/config"
)

const (
	unitFile     = "systemd/unicity.service"
	sysusersFile = "systemd/unicity.sysusers"
	tmpfilesFile = "systemd/unicity.tmpfiles"
)

// maxExposure is the highest `systemd-analyze security` exposure level the unit may have.
const maxExposure = 1.5

// unit is a parsed systemd unit: section → key → values in file order (keys may repeat).
type unit map[string]map[string][]string

func parseUnit(t *testing.T, path string) unit {
	t.Helper()
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	u := unit{}
	section := ""
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";"):
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = strings.Trim(line, "[]")
			u[section] = map[string][]string{}
		default:
			k, v, ok := strings.Cut(line, "=")
			require.Truef(t, ok && section != "", "%s:%d: not a key=value line in a section: %q", path, n, line)
			u[section][strings.TrimSpace(k)] = append(u[section][strings.TrimSpace(k)], strings.TrimSpace(v))
		}
	}
	require.NoError(t, sc.Err())
	return u
}

// words splits every value of a key into its space-separated words.
func (u unit) words(section, key string) []string {
	var w []string
	for _, v := range u[section][key] {
		w = append(w, strings.Fields(v)...)
	}
	return w
}

// TestUnitContract pins the settings the agent and the docs rely on, so that an edit that keeps
// the exposure score low cannot silently drop one of them.
func TestUnitContract(t *testing.T) {
	u := parseUnit(t, unitFile)
	exact := []struct{ section, key, want string }{
		{"Service", "Type", "notify"},
		{"Service", "ExecStart", "/usr/bin/unicity run"},
		{"Service", "ExecReload", "/bin/kill -HUP $MAINPID"},
		{"Service", "Restart", "on-failure"},
		{"Service", "RestartPreventExitStatus", "78"},
		{"Service", "User", "unicity"},
		{"Service", "StateDirectory", "unicity"},
		{"Service", "StateDirectoryMode", "0700"},
		{"Service", "RuntimeDirectory", "unicity"},
		{"Service", "ConfigurationDirectory", "unicity"},
		{"Service", "UMask", "0077"},
		{"Service", "DevicePolicy", "closed"},
		{"Service", "CapabilityBoundingSet", ""},
		{"Service", "RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"},
		{"Service", "ProtectSystem", "strict"},
		{"Service", "ProtectHome", "yes"},
		{"Service", "PrivateTmp", "yes"},
		{"Service", "NoNewPrivileges", "yes"},
		{"Service", "MemoryDenyWriteExecute", "yes"},
		{"Service", "SystemCallArchitectures", "native"},
		{"Install", "WantedBy", "multi-user.target"},
	}
	for _, c := range exact {
		t.Run(c.key, func(t *testing.T) {
			assert.Equal(t, []string{c.want}, u[c.section][c.key])
		})
	}
	t.Run("WatchdogSec", func(t *testing.T) {
		require.Len(t, u["Service"]["WatchdogSec"], 1)
		assert.NotContains(t, []string{"", "0", "infinity"}, u["Service"]["WatchdogSec"][0])
	})
	t.Run("DeviceAllow", func(t *testing.T) {
		assert.ElementsMatch(t, []string{"/dev/tpmrm0 rw", "/dev/tpm0 rw"}, u["Service"]["DeviceAllow"])
	})
	t.Run("SystemCallFilter", func(t *testing.T) {
		assert.Equal(t, "@system-service", u["Service"]["SystemCallFilter"][0])
	})
	t.Run("network and clock wanted, not required", func(t *testing.T) {
		for _, target := range []string{"network-online.target", "time-sync.target"} {
			assert.Contains(t, u.words("Unit", "Wants"), target)
			assert.Contains(t, u.words("Unit", "After"), target)
			assert.NotContains(t, u.words("Unit", "Requires"), target)
			assert.NotContains(t, u.words("Unit", "Requisite"), target)
			assert.NotContains(t, u.words("Unit", "BindsTo"), target)
		}
	})
}

var exposureRE = regexp.MustCompile(`Overall exposure level for unicity\.service: ([0-9.]+)`)

func TestUnitExposure(t *testing.T) {
	analyze := attesttest.RequireTool(t, "systemd-analyze")
	abs, err := filepath.Abs(unitFile)
	require.NoError(t, err)
	out, err := exec.Command(analyze, "security", "--offline=true", "--no-pager", abs).CombinedOutput()
	require.NoError(t, err, "%s", out)
	assertNoUnitWarnings(t, out)
	m := exposureRE.FindSubmatch(out)
	require.NotNil(t, m, "no exposure level in:\n%s", out)
	level, err := strconv.ParseFloat(string(m[1]), 64)
	require.NoError(t, err)
	assert.LessOrEqual(t, level, maxExposure, "systemd-analyze security:\n%s", out)
	t.Logf("exposure level %.1f", level)
}

// assertNoUnitWarnings fails on systemd's parse warnings (unknown or misplaced keys, bad
// values): systemd ignores such lines, so they would not fail a start, only weaken the unit.
func assertNoUnitWarnings(t *testing.T, out []byte) {
	t.Helper()
	for _, line := range strings.Split(string(out), "\n") {
		if strings.Contains(line, "unicity.service:") && !exposureRE.MatchString(line) {
			t.Errorf("systemd warns: %s", line)
		}
	}
}

// TestUnitVerifies runs `systemd-analyze verify` in a scratch root holding the system's own
// units (for the targets it names) and, when the agent is there, an executable at ExecStart.
func TestUnitVerifies(t *testing.T) {
	analyze := attesttest.RequireTool(t, "systemd-analyze")
	cases := []struct {
		name      string
		withAgent bool
		wantOK    bool
	}{
		{"installed", true, true},
		// The control: verify must notice a missing binary, or the case above proves nothing.
		{"agent missing", false, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			root := scratchRootWithSystemUnits(t)
			installFile(t, unitFile, filepath.Join(root, "usr/lib/systemd/system/unicity.service"), 0o644)
			if c.withAgent {
				installFile(t, "/bin/true", filepath.Join(root, "usr/bin/unicity"), 0o755)
			}
			out, err := exec.Command(analyze, "verify", "--no-pager", "--root="+root, "unicity.service").CombinedOutput()
			if !c.wantOK {
				assert.Error(t, err, "verify passed without the agent binary:\n%s", out)
				return
			}
			assert.NoError(t, err, "%s", out)
			assert.Empty(t, strings.TrimSpace(string(out)), "verify printed warnings")
		})
	}
}

// scratchRootWithSystemUnits returns a directory holding a copy of the host's system units,
// and the /bin/kill of the unit's ExecReload, which every image has (procps, util-linux or
// busybox).
func scratchRootWithSystemUnits(t *testing.T) string {
	t.Helper()
	root := t.TempDir()
	installFile(t, "/bin/kill", filepath.Join(root, "bin/kill"), 0o755)
	dst := filepath.Join(root, "usr/lib/systemd")
	require.NoError(t, os.MkdirAll(dst, 0o755))
	for _, src := range []string{"/usr/lib/systemd/system", "/lib/systemd/system"} {
		if _, err := os.Stat(filepath.Join(src, "multi-user.target")); err == nil {
			out, err := exec.Command("cp", "-a", src, dst).CombinedOutput()
			require.NoError(t, err, "%s", out)
			return root
		}
	}
	if attesttest.Strict() {
		t.Fatal("no system units (multi-user.target) on this machine")
	}
	t.Skip("no system units (multi-user.target) on this machine")
	return ""
}

func installFile(t *testing.T, src, dst string, mode os.FileMode) {
	t.Helper()
	data, err := os.ReadFile(src)
	require.NoError(t, err)
	require.NoError(t, os.MkdirAll(filepath.Dir(dst), 0o755))
	require.NoError(t, os.WriteFile(dst, data, mode))
}

func TestSysusersAndTmpfiles(t *testing.T) {
	sysusers := attesttest.RequireTool(t, "systemd-sysusers")
	tmpfiles := attesttest.RequireTool(t, "systemd-tmpfiles")
	requireRoot(t)
	root := t.TempDir()
	installFile(t, sysusersFile, filepath.Join(root, "usr/lib/sysusers.d/unicity.conf"), 0o644)
	installFile(t, tmpfilesFile, filepath.Join(root, "usr/lib/tmpfiles.d/unicity.conf"), 0o644)
	require.NoError(t, os.MkdirAll(filepath.Join(root, "etc"), 0o755))

	run(t, sysusers, "--root="+root, "unicity.conf")
	uid, gid := checkServiceUser(t, root)

	run(t, tmpfiles, "--root="+root, "--create", "unicity.conf")
	stateDir := filepath.Join(root, "var/lib/unicity")
	assertOwnerMode(t, stateDir, uid, gid, os.ModeDir|0o700)

	// What the factory line or a technician wrote there as root goes back to the service,
	// keeping its private mode.
	written := filepath.Join(stateDir, "identity.pem")
	require.NoError(t, os.WriteFile(written, []byte("x"), 0o600))
	require.NoError(t, os.Chown(written, 0, 0))
	run(t, tmpfiles, "--root="+root, "--create", "unicity.conf")
	assertOwnerMode(t, written, uid, gid, 0o600)
}

// checkServiceUser checks the unicity system user and its tss membership in root's account
// databases, and returns its IDs.
func checkServiceUser(t *testing.T, root string) (uid, gid int) {
	t.Helper()
	pw := accountEntry(t, filepath.Join(root, "etc/passwd"), "unicity")
	require.Len(t, pw, 7)
	uid, err := strconv.Atoi(pw[2])
	require.NoError(t, err)
	gid, err = strconv.Atoi(pw[3])
	require.NoError(t, err)
	assert.Less(t, uid, 1000, "not a system user")
	assert.Equal(t, "/var/lib/unicity", pw[5])
	assert.Contains(t, []string{"/usr/sbin/nologin", "/sbin/nologin", "/bin/false", "/usr/bin/false"}, pw[6])
	tss := accountEntry(t, filepath.Join(root, "etc/group"), "tss")
	require.Len(t, tss, 4)
	assert.Contains(t, strings.Split(tss[3], ","), "unicity")
	return uid, gid
}

// accountEntry returns the colon-separated fields of name's line in a passwd or group file.
func accountEntry(t *testing.T, file, name string) []string {
	t.Helper()
	data, err := os.ReadFile(file)
	require.NoError(t, err)
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Split(line, ":"); f[0] == name {
			return f
		}
	}
	t.Fatalf("%s has no entry for %s:\n%s", file, name, data)
	return nil
}

func assertOwnerMode(t *testing.T, path string, uid, gid int, mode os.FileMode) {
	t.Helper()
	fi, err := os.Lstat(path)
	require.NoError(t, err)
	st := fi.Sys().(*syscall.Stat_t)
	assert.Equal(t, mode.String(), fi.Mode().String(), path)
	assert.Equal(t, []int{uid, gid}, []int{int(st.Uid), int(st.Gid)}, "%s owner", path)
}

// requireRoot skips a test that creates files owned by other users unless it runs as root
// (CI does).
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if attesttest.Strict() {
		t.Fatal("this test must run as root (UNICITY_TEST_STRICT=1)")
	}
	t.Skip("needs root to create files owned by the service user")
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	require.NoError(t, err, "%s %s:\n%s", name, strings.Join(args, " "), out)
	return string(out)
}

// commentedSetting matches a commented-out `key = value` line of the shipped configuration.
var commentedSetting = regexp.MustCompile(`(?m)^# ([a-z_]+ = )`)

// TestShippedConfig checks /etc/unicity/config.toml as packaged: as shipped it asks for the one
// setting a gateway must make (the ID scope), and every setting it shows is a real key whose
// shown value is the agent's default, so that uncommenting a line changes nothing by surprise.
func TestShippedConfig(t *testing.T) {
	data, err := os.ReadFile("config.toml")
	require.NoError(t, err)

	t.Run("as shipped", func(t *testing.T) {
		_, err := config.Parse("config.toml", data)
		var ce *config.Error
		require.ErrorAs(t, err, &ce)
		assert.Equal(t, "provisioning.id_scope", ce.Key)
	})
	t.Run("every setting uncommented", func(t *testing.T) {
		uncommented := commentedSetting.ReplaceAll(data, []byte("$1"))
		cfg, err := config.Parse("config.toml", uncommented)
		require.NoError(t, err, "%s", uncommented)
		want := config.Default()
		want.Path = "config.toml"
		// The examples among the defaults.
		want.Provisioning.IDScope = cfg.Provisioning.IDScope
		want.Provisioning.Payload = cfg.Provisioning.Payload
		want.Attestation.SymmetricKey = cfg.Attestation.SymmetricKey
		assert.Equal(t, want, *cfg)
		assert.NotEmpty(t, cfg.Provisioning.IDScope)
	})
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	return data
}
