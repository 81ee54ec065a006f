package reliability_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/device"
)

// TestStatusAsAnotherUser runs `unicity status` as a user who may read the configuration but
// not the state directory (0700, the service's): it says that only it cannot read the state,
// not that the agent will set it aside; with the agent running, it shows the agent's
// assignment from the status file.
func TestStatusAsAnotherUser(t *testing.T) {
	if os.Geteuid() != 0 {
		if strict() {
			t.Fatal("needs root to run processes as other users")
		}
		t.Skip("needs root to run processes as other users")
	}
	e := startEmulator(t)
	g := x509Gateway(t, e, "gw-status", "")
	for d := g.dir; d != os.TempDir() && d != "/"; d = filepath.Dir(d) {
		require.NoError(t, os.Chmod(d, 0o755))
	}
	require.NoError(t, os.Chmod(g.config, 0o644))
	bin := filepath.Join(g.dir, "unicity")
	data, err := os.ReadFile(g.bin)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(bin, data, 0o755))

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c, out := g.command(ctx, "provision")
	require.NoError(t, c.Run(), "%s", out)

	status := func() string {
		cmd := exec.CommandContext(ctx, bin, "status", "--config", g.config)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		out, err := cmd.CombinedOutput()
		require.NoError(t, err, "%s", out)
		return string(out)
	}
	out1 := status()
	assert.Contains(t, out1, "permission denied (only this command cannot read it: run it as root to see the assignment)")
	assert.NotContains(t, out1, "set it aside")

	agent, _, exited := g.runAgent(t, ctx)
	g.awaitPhase(t, agent, exited, device.PhaseConnected, 30*time.Second)
	out2 := status()
	require.Len(t, e.line.Hubs, 1)
	assert.Regexp(t, `(?m)^  hub: +`+regexp.QuoteMeta(e.line.Hubs[0])+`$`, out2, "the running agent's assignment")
	assert.Regexp(t, `(?m)^  state file: +.*only this command cannot read it`, out2)
	assert.NotContains(t, out2, "set it aside")
	agent.Process.Signal(os.Interrupt)
	<-exited
}
