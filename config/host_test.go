package config

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestHostChecksRefuseDirectoriesOthersControl: a state or runtime directory writable by
// every user, or owned by someone other than root and the agent's user, is refused with the
// path and the fix; one that does not exist yet is fine (the agent creates it private).
func TestHostChecksRefuseDirectoriesOthersControl(t *testing.T) {
	dir := t.TempDir()
	cfg := Default()
	cfg.Path = "config.toml"
	cfg.State.Dir, cfg.Runtime.Dir = filepath.Join(dir, "state"), filepath.Join(dir, "run")
	check := func(name string, uid int) (string, error) {
		for _, hc := range cfg.HostChecks(uid) {
			if hc.Name == name {
				return hc.Check()
			}
		}
		t.Fatalf("no host check %q", name)
		return "", nil
	}
	me := os.Geteuid()

	detail, err := check("state dir", me)
	require.NoError(t, err)
	assert.Contains(t, detail, "does not exist yet")

	require.NoError(t, os.Mkdir(cfg.State.Dir, 0o700))
	detail, err = check("state dir", me)
	require.NoError(t, err)
	assert.Regexp(t, `state: owned by .*, mode 0700$`, detail)

	require.NoError(t, os.Mkdir(cfg.Runtime.Dir, 0o755))
	require.NoError(t, os.Chmod(cfg.Runtime.Dir, os.ModeSticky|0o777))
	_, err = check("runtime dir", me)
	var ce *Error
	require.ErrorAs(t, err, &ce)
	assert.Equal(t, "runtime.dir", ce.Key)
	assert.EqualError(t, err, "config.toml: runtime.dir: "+cfg.Runtime.Dir+" is writable by every user (mode 1777): any of them could change what the agent keeps there; fix: chmod o-w "+cfg.Runtime.Dir)
	_, err = check("runtime dir", AnyOwner)
	assert.Error(t, err, "whoever checks")

	if me != 0 {
		t.Skip("needs root to give a directory to another user")
	}
	require.NoError(t, os.Chown(cfg.State.Dir, 65534, 65534))
	_, err = check("state dir", me)
	require.ErrorAs(t, err, &ce)
	assert.Equal(t, "state.dir", ce.Key)
	assert.Contains(t, err.Error(), cfg.State.Dir+" is owned by ")
	assert.Contains(t, err.Error(), "uid 65534), not by root, which runs the agent: ")
	assert.Contains(t, err.Error(), "fix: chown root "+cfg.State.Dir)
	_, err = check("state dir", 65534)
	assert.NoError(t, err, "the agent's own user")
	_, err = check("state dir", AnyOwner)
	assert.NoError(t, err, "a command by hand cannot tell the service's user")
}

func TestHostChecksAPIGroup(t *testing.T) {
	cfg := Default()
	cfg.Path = "config.toml"
	cfg.State.Dir, cfg.Runtime.Dir = t.TempDir(), t.TempDir()
	cfg.API.Group = "no-such-group-here"
	_, err := cfg.HostChecks(os.Geteuid())[0].Check()
	var ce *Error
	require.ErrorAs(t, err, &ce)
	assert.Equal(t, "api.group", ce.Key)
	assert.Contains(t, err.Error(), "no-such-group-here")

	cfg.API.Group = ""
	detail, err := cfg.HostChecks(os.Geteuid())[0].Check()
	require.NoError(t, err)
	assert.Contains(t, detail, "not set")
}

// TestHostChecksTelemetryDir: the telemetry queue's directory is held to the state
// directory's rule, since whoever can write there can forge what the device sends.
func TestHostChecksTelemetryDir(t *testing.T) {
	cfg := Default()
	cfg.Path = "config.toml"
	cfg.Telemetry.Dir = filepath.Join(t.TempDir(), "telemetry")
	require.NoError(t, os.Mkdir(cfg.Telemetry.Dir, 0o700))
	require.NoError(t, os.Chmod(cfg.Telemetry.Dir, 0o777))
	for _, hc := range cfg.HostChecks(os.Geteuid()) {
		if hc.Name == "telemetry dir" {
			_, err := hc.Check()
			var ce *Error
			require.ErrorAs(t, err, &ce)
			assert.Equal(t, "telemetry.dir", ce.Key)
			assert.ErrorContains(t, err, "writable by every user")
			return
		}
	}
	t.Fatal("no telemetry dir check")
}
