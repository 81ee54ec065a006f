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

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/attest/attesttest"
)

// guides are the documents whose `sh walkthrough` blocks form one session, in this order: a
// newcomer's path from an empty gateway to a connected device, then its operation.
var guides = []string{"../docs/oem.md", "../docs/technicians.md", "../docs/operators.md"}

var walkthroughBlock = regexp.MustCompile("(?ms)^```sh walkthrough\n(.*?)^```")

// walkthroughScript joins the guides' walkthrough blocks into one bash script that stops at
// the first failing command and traces each one.
func walkthroughScript(t *testing.T) string {
	t.Helper()
	var script strings.Builder
	script.WriteString("set -euxo pipefail\n")
	for _, guide := range guides {
		blocks := walkthroughBlock.FindAllSubmatch(readFile(t, guide), -1)
		require.NotEmpty(t, blocks, "%s has no walkthrough block", guide)
		for i, b := range blocks {
			fmt.Fprintf(&script, "\n# %s, block %d\n%s", filepath.Base(guide), i+1, b[1])
		}
	}
	return script.String()
}

// TestGuidesWalkthroughShellcheck holds the walkthrough to shellcheck: a newcomer copies
// these lines, quoting mistakes and all.
func TestGuidesWalkthroughShellcheck(t *testing.T) {
	shellcheck := attesttest.RequireTool(t, "shellcheck")
	cmd := exec.Command(shellcheck, "--shell=bash", "-")
	cmd.Stdin = strings.NewReader(walkthroughScript(t))
	out, err := cmd.CombinedOutput()
	assert.NoError(t, err, "%s", out)
}

// TestGuidesWalkthrough runs the guides' walkthrough blocks, in order, as one bash session
// started in the repository with an empty home directory: the commands a newcomer types,
// against swtpm and the emulator. Every process the session starts is killed at the end.
func TestGuidesWalkthrough(t *testing.T) {
	for _, tool := range []string{"bash", "make", "swtpm", "jq", "curl", "timeout"} {
		attesttest.RequireTool(t, tool)
	}
	script := walkthroughScript(t)

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
	cmd := exec.CommandContext(ctx, "bash", "-c", script)
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

var (
	// shBlock is a fenced shell block (walkthrough or not) of a guide.
	shBlock = regexp.MustCompile("(?ms)^```sh[^\n]*\n(.*?)^```")
	// inlineCommand is a command quoted in a guide's prose.
	inlineCommand = regexp.MustCompile("`(unicity(?:-emulator)? [^`]*)`")
	// commandSeparator ends one command of a shell line and may start another.
	commandSeparator = regexp.MustCompile(`\|\||&&|[|;&()]|\$\(`)
	commandWord      = regexp.MustCompile(`^[a-z][a-z0-9-]*$`)
	placeholder      = regexp.MustCompile(`^[A-Z][A-Z0-9_]+$`)
)

// guideCommand is one invocation of unicity or unicity-emulator quoted in a guide.
type guideCommand struct {
	program string   // unicity or unicity-emulator
	path    []string // the command words: factory keygen
	flags   []string // the flag names used, without dashes or values
	text    string
}

// guideCommands finds every unicity and unicity-emulator invocation in a guide's shell blocks
// and in its prose, except those that name their command by a placeholder (COMMAND).
func guideCommands(t *testing.T, guide string) []guideCommand {
	t.Helper()
	text := readFile(t, guide)
	var lines []string
	for _, b := range shBlock.FindAllSubmatch(text, -1) {
		joined := strings.ReplaceAll(string(b[1]), "\\\n", " ")
		lines = append(lines, strings.Split(joined, "\n")...)
	}
	for _, m := range inlineCommand.FindAllSubmatch(text, -1) {
		lines = append(lines, string(m[1]))
	}
	var cmds []guideCommand
	for _, line := range lines {
		if i := strings.Index(line, "#"); i >= 0 {
			line = line[:i]
		}
		for _, segment := range commandSeparator.Split(line, -1) {
			words := strings.Fields(segment)
			if len(words) == 0 || (words[0] != "unicity" && words[0] != "unicity-emulator") {
				continue
			}
			c := guideCommand{program: words[0], text: strings.TrimSpace(segment)}
			rest := words[1:]
			for len(rest) > 0 && commandWord.MatchString(rest[0]) {
				c.path, rest = append(c.path, rest[0]), rest[1:]
			}
			if len(rest) > 0 && placeholder.MatchString(rest[0]) {
				continue
			}
			for _, w := range rest {
				if name, ok := strings.CutPrefix(w, "--"); ok {
					name, _, _ = strings.Cut(name, "=")
					c.flags = append(c.flags, name)
				}
			}
			cmds = append(cmds, c)
		}
	}
	return cmds
}

// TestGuidesCommandsExist checks every unicity and unicity-emulator command the guides quote,
// including those for real gateways that the walkthrough cannot run, against the CLI: the
// command exists and takes the flags shown.
func TestGuidesCommandsExist(t *testing.T) {
	bin := t.TempDir()
	build := exec.Command("go", "build", "-o", bin+"/", "./cmd/unicity", "./cmd/unicity-emulator")
	build.Dir = ".."
	out, err := build.CombinedOutput()
	require.NoError(t, err, "%s", out)

	checked := 0
	for _, guide := range append(guides, "../README.md") {
		for _, c := range guideCommands(t, guide) {
			t.Run(filepath.Base(guide)+"/"+c.text, func(t *testing.T) {
				args := append(append([]string{}, c.path...), "--help")
				help, err := exec.Command(filepath.Join(bin, c.program), args...).CombinedOutput()
				require.NoError(t, err, "%s %s: %s", c.program, strings.Join(args, " "), help)
				for _, f := range c.flags {
					assert.Regexp(t, `(?m)^\s+-`+regexp.QuoteMeta(f)+`\b`, string(help), "%s takes no --%s", c.text, f)
				}
			})
			checked++
		}
	}
	require.Greater(t, checked, 50, "the guides quote fewer commands than they do")
}
