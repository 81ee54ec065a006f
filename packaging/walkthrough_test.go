package packaging_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/attest/attesttest"
)

// guides are the documents whose `sh walkthrough` blocks form one session, in this order: a
// newcomer's path from an empty gateway to a connected device, then its operation.
var guides = []string{"../docs/oem.md", "../docs/technicians.md", "../docs/operators.md"}

var walkthroughBlock = regexp.MustCompile("(?ms)^```sh walkthrough\n(.*?)^```")

// TestGuidesWalkthrough runs the guides' walkthrough blocks, in order, as one bash session
// started in the repository with an empty home directory: the commands a newcomer types,
// against swtpm and the emulator. Every process the session starts is killed at the end.
func TestGuidesWalkthrough(t *testing.T) {
	for _, tool := range []string{"bash", "make", "swtpm", "jq", "curl", "timeout"} {
		attesttest.RequireTool(t, tool)
	}
	var script strings.Builder
	script.WriteString("set -euxo pipefail\n")
	for _, guide := range guides {
		blocks := walkthroughBlock.FindAllSubmatch(readFile(t, guide), -1)
		require.NotEmpty(t, blocks, "%s has no walkthrough block", guide)
		for i, b := range blocks {
			fmt.Fprintf(&script, "\n# %s, block %d\n%s", filepath.Base(guide), i+1, b[1])
		}
	}

	repo, err := filepath.Abs("..")
	require.NoError(t, err)
	// The guide builds with make: keep the build and module caches of the real home.
	env := append(os.Environ(), "HOME="+t.TempDir())
	for _, v := range []string{"GOCACHE", "GOMODCACHE", "GOPATH"} {
		env = append(env, v+"="+strings.TrimSpace(run(t, "go", "env", v)))
	}
	logPath := filepath.Join(t.TempDir(), "walkthrough.log")
	logFile, err := os.Create(logPath)
	require.NoError(t, err)
	defer logFile.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", "-c", script.String())
	cmd.Dir, cmd.Env = repo, env
	// Output to a file, not a pipe: background processes keep a pipe open after bash exits.
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// Its own process group, so that the emulator, swtpm and the agent it starts in the
	// background go with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	err = cmd.Run()
	if cmd.Process != nil {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	}
	if err != nil {
		t.Fatalf("walkthrough failed: %v\n%s", err, readFile(t, logPath))
	}
	t.Logf("walkthrough:\n%s", readFile(t, logPath))
}
