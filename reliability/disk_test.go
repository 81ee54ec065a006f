package reliability_test

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/device"
	"github.com/unicity-iot/unicity/storage"
)

// mountTmpfs mounts a tmpfs of size bytes at dir (root only), unmounted when the test ends.
func mountTmpfs(t *testing.T, dir string, size string) {
	t.Helper()
	require.NoError(t, os.MkdirAll(dir, 0o700))
	out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size+",mode=0700", "tmpfs", dir).CombinedOutput()
	if err != nil {
		if strict() && os.Geteuid() == 0 {
			t.Fatalf("mount tmpfs: %v: %s", err, out)
		}
		t.Skipf("cannot mount a tmpfs (%v: %s): needs root", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", dir).Run() })
}

// fill writes to dir until the file system is full.
func fill(t *testing.T, dir string) {
	f, err := os.Create(filepath.Join(dir, "filler"))
	require.NoError(t, err)
	defer f.Close()
	buf := make([]byte, 4096)
	for {
		if _, err := f.Write(buf); err != nil {
			require.ErrorContains(t, err, "no space left on device")
			return
		}
	}
}

// TestStateDiskFullAndReadOnly provisions onto a real tmpfs state directory, then fills it,
// then makes it read-only: a re-registration by hand fails naming the disk (75 when full,
// 78 when read-only) and the stored assignment stays as it was; the service runs on it in
// both cases.
func TestStateDiskFullAndReadOnly(t *testing.T) {
	e := startEmulator(t, "--poll-limit", "0")
	g := x509Gateway(t, e, "gw-disk", "")
	mountTmpfs(t, g.state, "256k")

	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	c, out := g.command(ctx, "provision")
	require.NoError(t, c.Run(), "%s", out)
	before, err := os.ReadFile(filepath.Join(g.state, storage.FileName))
	require.NoError(t, err)

	t.Run("disk full", func(t *testing.T) {
		fill(t, g.state)
		c, out := g.command(ctx, "reprovision", "--force")
		err := c.Run()
		var ee *exec.ExitError
		require.True(t, errors.As(err, &ee), "reprovision fails: %v\n%s", err, out)
		assert.Equal(t, 75, ee.ExitCode(), "temporary: it succeeds once space is freed")
		assert.Contains(t, out.String(), "no space left on device", "the reason is given")
		assert.Contains(t, out.String(), "not registering, the assignment could not be stored: cannot write in "+g.state+": its file system is full", "the disk is named, before a registration is spent")
		after, err := os.ReadFile(filepath.Join(g.state, storage.FileName))
		require.NoError(t, err)
		assert.Equal(t, before, after, "the stored assignment is intact")
		tmp, _ := filepath.Glob(filepath.Join(g.state, ".state.json.tmp-*"))
		assert.Empty(t, tmp, "no partial temporary file left")

		// The service needs no disk to run on a stored assignment.
		agent, _, exited := g.runAgent(t, ctx)
		g.awaitPhase(t, agent, exited, device.PhaseConnected, 30*time.Second)
		agent.Process.Signal(os.Interrupt)
		<-exited
		require.NoError(t, os.Remove(filepath.Join(g.state, "filler")))
	})

	t.Run("read-only", func(t *testing.T) {
		out, err := exec.Command("mount", "-o", "remount,ro", g.state).CombinedOutput()
		require.NoError(t, err, "%s", out)
		defer exec.Command("mount", "-o", "remount,rw", g.state).Run()
		c, cout := g.command(ctx, "reprovision", "--force")
		err = c.Run()
		var ee *exec.ExitError
		require.True(t, errors.As(err, &ee), "reprovision fails: %v\n%s", err, cout)
		assert.Equal(t, 78, ee.ExitCode(), "the image's configuration: a retry cannot help")
		assert.Contains(t, cout.String(), g.state+": its file system is read-only", "the reason is given")
		after, err := os.ReadFile(filepath.Join(g.state, storage.FileName))
		require.NoError(t, err)
		assert.Equal(t, before, after, "the stored assignment is intact")

		// The service takes the lock read-only and runs on the stored assignment, saying
		// that a new one could not be stored.
		agent, _, exited := g.runAgent(t, ctx)
		g.awaitPhase(t, agent, exited, device.PhaseConnected, 30*time.Second)
		s, err := device.ReadStatus(g.run)
		require.NoError(t, err)
		assert.Contains(t, s.LastError, "read-only")
		agent.Process.Signal(os.Interrupt)
		<-exited
	})
}

// TestFirstBootDiskFull starts a device that never registered on a full state disk: it
// registers with DPS once (each registration is billed and counts against the quota),
// connects with the assignment it could not store, says so in its status, and stores it
// once space is freed.
func TestFirstBootDiskFull(t *testing.T) {
	e := startEmulator(t, "--poll-limit", "0")
	g := x509Gateway(t, e, "gw-full", "")
	mountTmpfs(t, g.state, "256k")
	fill(t, g.state)

	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	agent, out, exited := g.runAgent(t, ctx)
	g.awaitPhase(t, agent, exited, device.PhaseConnected, 30*time.Second)
	s, err := device.ReadStatus(g.run)
	require.NoError(t, err)
	assert.Contains(t, s.StoreError, "no space left on device", "the status says the assignment is not stored")
	assert.Contains(t, s.StoreError, g.state, "and names the state directory")
	_, err = os.Stat(filepath.Join(g.state, storage.FileName))
	assert.ErrorIs(t, err, os.ErrNotExist)
	c, sout := g.command(ctx, "status")
	require.NoError(t, c.Run(), "%s", sout)
	assert.Regexp(t, `(?m)^  hub: +`+regexp.QuoteMeta(s.AssignedHub)+`$`, sout.String(), "the assignment in use")
	assert.Regexp(t, `(?m)^  not stored: +cannot store the provisioning state in .*: its file system is full`, sout.String())

	require.NoError(t, os.Remove(filepath.Join(g.state, "filler")))
	deadline := time.Now().Add(20 * time.Second)
	for {
		s, err = device.ReadStatus(g.run)
		require.NoError(t, err)
		if s.StoreError == "" || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	assert.Empty(t, s.StoreError, "the write is retried once there is space")
	assert.Equal(t, device.PhaseConnected, s.Phase)
	st, err := storage.New(g.state).Load()
	require.NoError(t, err, "the assignment in use is stored")
	assert.Equal(t, s.AssignedHub, st.AssignedHub)

	agent.Process.Signal(os.Interrupt)
	<-exited
	assert.Equal(t, 1, strings.Count(out.String(), "registering gw-full with DPS"), "one registration:\n%s", out)
}
