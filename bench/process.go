package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/unicity-iot/unicity/bench/proxy"
)

// stopTimeout is how long a process gets to end after SIGTERM before it is killed.
const stopTimeout = 10 * time.Second

// process is a child process with its stderr logged to a file.
type process struct {
	cmd    *exec.Cmd
	exited chan struct{}
	err    error // set when exited is closed
}

func startProcess(cmd *exec.Cmd) (*process, error) {
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &process{cmd: cmd, exited: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.exited)
	}()
	return p, nil
}

// stop ends the process with SIGTERM, or SIGKILL if it does not end in time.
func (p *process) stop() error {
	select {
	case <-p.exited:
		return nil
	default:
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
		return nil
	case <-time.After(stopTimeout):
		p.cmd.Process.Kill()
		<-p.exited
		return fmt.Errorf("%s did not stop within %s of SIGTERM", filepath.Base(p.cmd.Path), stopTimeout)
	}
}

// serveInfo is the line `unicity-emulator serve` prints once listening.
type serveInfo struct {
	IDScope     string `json:"id_scope"`
	DPS         string `json:"dps"`
	Hub         string `json:"hub"`
	TrustBundle string `json:"trust_bundle"`
	AdminSocket string `json:"admin_socket"`
}

// stack is a running emulator with counting proxies in front of its DPS and its hub.
type stack struct {
	emu      *process
	info     serveInfo
	dps, hub *proxy.TCP
}

// hubProxyHost is the loopback address the hub proxy listens on. DPS assigns a hub by the
// port of its listener: the hub listens on 127.0.0.1:P, DPS names it hubProxyHost:P
// (--hub-host), and the agent reaches it through the proxy there.
const hubProxyHost = "127.0.0.2"

// startStack starts `unicity-emulator serve` with args after the harness's own.
func (h *harness) startStack(ctx context.Context, name string, args ...string) (*stack, error) {
	var lastErr error
	for range 5 { // the hub port is chosen on 127.0.0.2 and may be taken on 127.0.0.1
		l, err := net.Listen("tcp", net.JoinHostPort(hubProxyHost, "0"))
		if err != nil {
			return nil, fmt.Errorf("hub proxy: %w", err)
		}
		_, port, _ := net.SplitHostPort(l.Addr().String())
		l.Close()
		s, err := h.tryStack(ctx, name, port, args)
		if err == nil {
			return s, nil
		}
		lastErr = err
	}
	return nil, lastErr
}

func (h *harness) tryStack(ctx context.Context, name, port string, args []string) (*stack, error) {
	hubAddr := net.JoinHostPort("127.0.0.1", port)
	hub, err := proxy.ListenTCP(net.JoinHostPort(hubProxyHost, port), hubAddr)
	if err != nil {
		return nil, fmt.Errorf("hub proxy: %w", err)
	}
	logFile, err := os.Create(filepath.Join(h.work, name+"-emulator.log"))
	if err != nil {
		hub.Close()
		return nil, err
	}
	defer logFile.Close()
	cmd := exec.Command(filepath.Join(h.opts.Bin, "unicity-emulator"), append([]string{"serve", "--dir", h.emuDir,
		"--hub-addr", hubAddr, "--hub-host", hubProxyHost, "--hub-ws-addr", "-", "--dps-ws-addr", "-"}, args...)...)
	cmd.Stderr = logFile
	out, err := cmd.StdoutPipe()
	if err != nil {
		hub.Close()
		return nil, err
	}
	emu, err := startProcess(cmd)
	if err != nil {
		hub.Close()
		return nil, err
	}
	line := make(chan string, 1)
	go func() {
		s, _ := bufio.NewReader(out).ReadString('\n')
		line <- s
		io.Copy(io.Discard, out)
	}()
	s := &stack{emu: emu, hub: hub}
	select {
	case l := <-line:
		if err := json.Unmarshal([]byte(l), &s.info); err != nil || s.info.DPS == "" {
			emu.stop()
			hub.Close()
			data, _ := os.ReadFile(logFile.Name())
			return nil, fmt.Errorf("unicity-emulator serve did not start: %s", strings.TrimSpace(string(data)))
		}
	case <-ctx.Done():
		emu.stop()
		hub.Close()
		return nil, ctx.Err()
	}
	if s.dps, err = proxy.ListenTCP("127.0.0.1:0", s.info.DPS); err != nil {
		s.close()
		return nil, fmt.Errorf("DPS proxy: %w", err)
	}
	return s, nil
}

func (s *stack) close() error {
	err := s.emu.stop()
	if s.dps != nil {
		s.dps.Close()
	}
	s.hub.Close()
	return err
}

// swtpm is a software TPM serving a unix socket, with a counting proxy in front.
type swtpm struct {
	proc   *process
	socket string // swtpm's own, for the factory commands
	proxy  *proxy.TPM
}

func (h *harness) startSWTPM(ctx context.Context) (*swtpm, error) {
	path, err := exec.LookPath("swtpm")
	if err != nil {
		return nil, fmt.Errorf("swtpm is not installed (apt-get install swtpm): %w", err)
	}
	dir := filepath.Join(h.work, "tpm")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	sock := filepath.Join(dir, "sock")
	logFile, err := os.Create(filepath.Join(h.work, "swtpm.log"))
	if err != nil {
		return nil, err
	}
	defer logFile.Close()
	cmd := exec.Command(path, "socket", "--tpm2", "--tpmstate", "dir="+dir,
		"--server", "type=unixio,path="+sock, "--ctrl", "type=unixio,path="+sock+".ctrl",
		"--flags", "not-need-init,startup-clear")
	cmd.Stdout, cmd.Stderr = logFile, logFile
	proc, err := startProcess(cmd)
	if err != nil {
		return nil, err
	}
	t := &swtpm{proc: proc, socket: sock}
	for {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		select {
		case <-proc.exited:
			return nil, fmt.Errorf("swtpm exited: %v (see %s)", proc.err, logFile.Name())
		case <-ctx.Done():
			proc.stop()
			return nil, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	if t.proxy, err = proxy.ListenTPM(filepath.Join(dir, "counted.sock"), sock); err != nil {
		proc.stop()
		return nil, err
	}
	return t, nil
}

func (t *swtpm) close() error {
	t.proxy.Close()
	return t.proc.stop()
}

// logLine is a line the agent logged, stamped when the harness read it.
type logLine struct {
	at   time.Time
	text string
}

// agent is a running `unicity run`.
type agent struct {
	*process
	start  time.Time
	events chan logLine // the lines, for waitLine
	mu     sync.Mutex
	log    []logLine // every line so far
}

// startAgent starts `unicity run` for d; its log goes to logPath as well.
func (h *harness) startAgent(d *device, logPath string) (*agent, error) {
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(filepath.Join(h.opts.Bin, "unicity"), "run", "--config", d.config)
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET=", "WATCHDOG_USEC=", "JOURNAL_STREAM=")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		logFile.Close()
		return nil, err
	}
	a := &agent{events: make(chan logLine, 4096)}
	a.start = time.Now()
	if a.process, err = startProcess(cmd); err != nil {
		logFile.Close()
		return nil, err
	}
	go func() {
		defer logFile.Close()
		defer close(a.events)
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			l := logLine{at: time.Now(), text: sc.Text()}
			fmt.Fprintln(logFile, l.text)
			a.mu.Lock()
			a.log = append(a.log, l)
			a.mu.Unlock()
			select {
			case a.events <- l:
			default: // nobody waits for this phase; the file has it
			}
		}
	}()
	return a, nil
}

func (a *agent) pid() int { return a.cmd.Process.Pid }

// waitPhase returns when the agent logs that it entered phase.
func (a *agent) waitPhase(ctx context.Context, phase string, timeout time.Duration) (time.Time, error) {
	return a.waitLine(ctx, "phase "+phase, timeout, func(line string) (bool, error) { return hasField(line, "phase", phase), nil })
}

// waitLine returns when the agent logs a line that match accepts, or match's error; what
// names the line in the errors.
func (a *agent) waitLine(ctx context.Context, what string, timeout time.Duration, match func(line string) (bool, error)) (time.Time, error) {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		select {
		case l, ok := <-a.events:
			if !ok {
				<-a.exited
				return time.Time{}, fmt.Errorf("the agent exited (%v) before %s:\n%s", a.err, what, a.lastLines())
			}
			if done, err := match(l.text); err != nil {
				return time.Time{}, fmt.Errorf("%w:\n%s", err, a.lastLines())
			} else if done {
				return l.at, nil
			}
		case <-timer.C:
			return time.Time{}, fmt.Errorf("no %s within %s:\n%s", what, timeout, a.lastLines())
		case <-ctx.Done():
			return time.Time{}, ctx.Err()
		}
	}
}

// lines returns what the agent logged so far.
func (a *agent) lines() []logLine {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.log)
}

// firstLine is when the agent logged a line holding text, from its start; false if it did not.
func (a *agent) firstLine(text string) (time.Duration, bool) {
	for _, l := range a.lines() {
		if strings.Contains(l.text, text) {
			return l.at.Sub(a.start), true
		}
	}
	return 0, false
}

func (a *agent) lastLines() string {
	lines := a.lines()
	var b strings.Builder
	for _, l := range lines[max(len(lines)-20, 0):] {
		b.WriteString("  " + l.text + "\n")
	}
	return b.String()
}

// hasField reports whether a logfmt line has key=value.
func hasField(line, key, value string) bool {
	for _, f := range strings.Fields(line) {
		if f == key+"="+value {
			return true
		}
	}
	return false
}

// run runs a command to completion, with its output in the error when it fails.
func run(ctx context.Context, name string, args ...string) error {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", filepath.Base(name), strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}
