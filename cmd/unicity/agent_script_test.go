package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/rogpeppe/go-internal/testscript"

	"github.com/unicity-iot/unicity/config"
	"github.com/unicity-iot/unicity/device"
	"github.com/unicity-iot/unicity/internal/poll"
	"github.com/unicity-iot/unicity/localapi"
	"github.com/unicity-iot/unicity/storage"
)

// Harness commands for the agent scenarios (run, provision, reprovision, status, check):
//
//	emulator init
//	    build unicity-emulator (once per test binary), put it on PATH and run
//	    "unicity-emulator init --dir $WORK/emu"; sets EMU_DIR.
//	emulator start [SERVE FLAGS...]
//	    start "unicity-emulator serve --dir $EMU_DIR" in the background, stopped when the
//	    script ends, and set ID_SCOPE, DPS_ADDR, HUB, HUB2 (with --hubs 2) and TRUST_BUNDLE
//	    from the line it prints.
//	emulator stop
//	    stop the running emulator (DPS and hubs become unreachable).
//	freeport VAR
//	    set VAR to a free TCP port on 127.0.0.1.
//	awaitstatus RUNDIR PHASE [TIMEOUT]
//	    wait (default 60s) until the agent's status file in RUNDIR shows PHASE.
//	statefile DIR absent|valid|aside|hub NAME
//	    check the provisioning state in DIR: no state file, a complete one, a corrupt one
//	    kept aside (state.json.corrupt-*), or one assigned to hub NAME.
//	awaitcert STATEDIR RUNDIR VAR [NOT]
//	    wait (60s) until the agent is connected with an operational certificate stored in
//	    STATEDIR, other than the one whose SHA-256 thumbprint is NOT; set VAR to its thumbprint.
//	awaitrenewal STATEDIR RUNDIR VIA VAR [NOT]
//	    wait (60s) until the running agent, asked through its local API in RUNDIR, is
//	    connected with a certificate it renewed through VIA (hub or dps), other than the one
//	    whose SHA-256 thumbprint is NOT, and STATEDIR stores it with nothing on trial; set VAR
//	    to its thumbprint.
//	awaittwin STATEDIR DEVICE [REGEXP]
//	    wait (30s) until DEVICE's twin reports (unicity.validFrom/validUntil) the validity of
//	    the operational certificate stored in STATEDIR, and matches REGEXP; the twin is then
//	    the stdout to check.
//	awaitexpiry STATEDIR
//	    wait (60s) until the operational certificate stored in STATEDIR has expired.
//	expand SRC DST
//	    copy SRC to DST with $VAR and ${VAR} replaced by the script's environment (config
//	    files that name the emulator's addresses and the TPM).
//
// UNICITY_TEST_CLOCK_FILE (honoured by the test binary only) makes the agent read its wall
// clock from a file: an RFC 3339 time while the file holds one, the real time otherwise.

func init() {
	if path := os.Getenv("UNICITY_TEST_CLOCK_FILE"); path != "" {
		agentClock = fileClock(path)
	}
}

// fileClock is the "clock in 1970" seam: the time written in the file, else the real time.
type fileClock string

func (f fileClock) Now() time.Time {
	b, err := os.ReadFile(string(f))
	if err == nil {
		if t, err := time.Parse(time.RFC3339, strings.TrimSpace(string(b))); err == nil {
			return t
		}
	}
	return time.Now()
}

func (fileClock) After(d time.Duration) <-chan time.Time { return time.After(d) }

// harnessWait bounds what the harness waits for from a program that should answer at once,
// so that a wedged one fails its script instead of hanging the test binary.
const harnessWait = 30 * time.Second

var (
	emulatorOnce sync.Once
	emulatorBin  string
	emulatorErr  error
)

// buildEmulator builds unicity-emulator into a directory that lives as long as the test
// binary's process tree needs it.
func buildEmulator() (string, error) {
	emulatorOnce.Do(func() {
		dir, err := os.MkdirTemp("", "unicity-emulator-bin")
		if err != nil {
			emulatorErr = err
			return
		}
		bin := filepath.Join(dir, "unicity-emulator")
		cmd := exec.Command("go", "build", "-o", bin, "../unicity-emulator")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			emulatorErr = fmt.Errorf("cannot build unicity-emulator: %v\n%s", err, out)
			return
		}
		emulatorBin = bin
	})
	return emulatorBin, emulatorErr
}

// emulators holds each script's running emulator.
var emulators sync.Map // *testscript.TestScript → *runningEmulator

type runningEmulator struct {
	cmd  *exec.Cmd
	done chan struct{}
}

func (r *runningEmulator) stop() {
	r.cmd.Process.Signal(os.Interrupt)
	select {
	case <-r.done:
	case <-time.After(5 * time.Second):
		r.cmd.Process.Kill()
		<-r.done
	}
}

func cmdEmulator(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) == 0 {
		ts.Fatalf("usage: emulator init | start [SERVE FLAGS...] | stop")
	}
	switch args[0] {
	case "init":
		bin, err := buildEmulator()
		ts.Check(err)
		ts.Setenv("PATH", filepath.Dir(bin)+string(os.PathListSeparator)+ts.Getenv("PATH"))
		dir := ts.MkAbs("emu")
		ctx, cancel := context.WithTimeout(context.Background(), harnessWait)
		defer cancel()
		out, err := exec.CommandContext(ctx, bin, "init", "--dir", dir).CombinedOutput()
		if err != nil {
			ts.Fatalf("unicity-emulator init: %v\n%s", err, out)
		}
		ts.Setenv("EMU_DIR", dir)
	case "start":
		if _, ok := emulators.Load(ts); ok {
			ts.Fatalf("emulator already running")
		}
		bin, err := buildEmulator()
		ts.Check(err)
		cmd := exec.Command(bin, append([]string{"serve", "--dir", ts.Getenv("EMU_DIR")}, args[1:]...)...)
		cmd.Stderr = os.Stderr
		stdout, err := cmd.StdoutPipe()
		ts.Check(err)
		ts.Check(cmd.Start())
		r := &runningEmulator{cmd: cmd, done: make(chan struct{})}
		lines := bufio.NewScanner(stdout)
		firstLine := make(chan []byte, 1)
		go func() {
			if lines.Scan() {
				firstLine <- append([]byte(nil), lines.Bytes()...)
			}
			close(firstLine)
			for lines.Scan() {
			}
			cmd.Wait()
			close(r.done)
		}()
		var first []byte
		select {
		case first = <-firstLine:
		case <-time.After(harnessWait):
		}
		if first == nil {
			cmd.Process.Kill()
			<-r.done
			ts.Fatalf("unicity-emulator serve printed nothing within %s", harnessWait)
		}
		emulators.Store(ts, r)
		ts.Defer(func() {
			if _, ok := emulators.LoadAndDelete(ts); ok {
				r.stop()
			}
		})
		var line struct {
			IDScope     string   `json:"id_scope"`
			DPS         string   `json:"dps"`
			Hubs        []string `json:"hubs"`
			TrustBundle string   `json:"trust_bundle"`
		}
		ts.Check(json.Unmarshal(first, &line))
		ts.Setenv("ID_SCOPE", line.IDScope)
		ts.Setenv("DPS_ADDR", line.DPS)
		ts.Setenv("HUB", line.Hubs[0])
		if len(line.Hubs) > 1 {
			ts.Setenv("HUB2", line.Hubs[1])
		}
		ts.Setenv("TRUST_BUNDLE", line.TrustBundle)
	case "stop":
		r, ok := emulators.LoadAndDelete(ts)
		if !ok {
			ts.Fatalf("no emulator running")
		}
		r.(*runningEmulator).stop()
	default:
		ts.Fatalf("emulator: unknown subcommand %q", args[0])
	}
}

func cmdFreePort(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 1 {
		ts.Fatalf("usage: freeport VAR")
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	ts.Check(err)
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	ts.Setenv(args[0], strconv.Itoa(port))
}

func cmdAwaitStatus(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) < 2 || len(args) > 3 {
		ts.Fatalf("usage: awaitstatus RUNDIR PHASE [TIMEOUT]")
	}
	timeout := 60 * time.Second
	if len(args) == 3 {
		d, err := time.ParseDuration(args[2])
		ts.Check(err)
		timeout = d
	}
	dir, want := ts.MkAbs(args[0]), device.Phase(args[1])
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var last *device.Status
	err := poll.Until(ctx, 50*time.Millisecond, func() bool {
		if s, err := device.ReadStatus(dir); err == nil {
			last = s
		}
		return last != nil && last.Phase == want
	})
	if err == nil {
		ts.Logf("status: %s: %s", last.Phase, last.Message)
		return
	}
	if last == nil {
		ts.Fatalf("no status in %s after %s", dir, timeout)
	}
	ts.Fatalf("phase %s after %s, want %s: %s (last error: %s)", last.Phase, timeout, want, last.Message, last.LastError)
}

func cmdStateFile(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) < 2 {
		ts.Fatalf("usage: statefile DIR absent|valid|aside|hub NAME")
	}
	st, err := storage.New(ts.MkAbs(args[0])).Load()
	switch args[1] {
	case "absent":
		if !errors.Is(err, storage.ErrNotExist) {
			ts.Fatalf("state file present (%v)", err)
		}
	case "valid":
		ts.Check(err)
	case "aside":
		kept, _ := filepath.Glob(filepath.Join(ts.MkAbs(args[0]), storage.FileName+".corrupt-*"))
		if len(kept) == 0 {
			ts.Fatalf("no corrupt state kept aside in %s", args[0])
		}
	case "hub":
		if len(args) != 3 {
			ts.Fatalf("usage: statefile DIR hub NAME")
		}
		ts.Check(err)
		if st.AssignedHub != args[2] {
			ts.Fatalf("state assigns hub %s, want %s", st.AssignedHub, args[2])
		}
	default:
		ts.Fatalf("statefile: unknown check %q", args[1])
	}
}

// cmdAwaitCert: awaitcert STATEDIR RUNDIR VAR [NOT]: wait until the agent is connected with
// an operational certificate stored in STATEDIR (whose SHA-256 thumbprint is not NOT), its
// key there; VAR is set to the thumbprint.
func cmdAwaitCert(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) < 3 || len(args) > 4 {
		ts.Fatalf("usage: awaitcert STATEDIR RUNDIR VAR [NOT]")
	}
	stateDir, runDir := ts.MkAbs(args[0]), ts.MkAbs(args[1])
	var not string
	if len(args) == 4 {
		not = args[3]
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var thumb, last string
	err := poll.Until(ctx, 50*time.Millisecond, func() bool {
		_, op, err := storedInUse(ts, stateDir)
		if err != nil {
			last = err.Error()
			return false
		}
		s, err := device.ReadStatus(runDir)
		if err != nil || s.Phase != device.PhaseConnected || s.Credential != device.CredentialOperational {
			last = fmt.Sprintf("status %+v (%v)", s, err)
			return false
		}
		thumb = op.SHA256Thumbprint
		return !strings.EqualFold(thumb, not)
	})
	if err != nil {
		ts.Fatalf("no new operational certificate in use: %s", last)
	}
	ts.Setenv(args[2], thumb)
}

// cmdAwaitRenewal: awaitrenewal STATEDIR RUNDIR VIA VAR [NOT]: wait until the agent has
// renewed through VIA (hub or dps) to a certificate stored in STATEDIR other than NOT; VAR is
// set to its thumbprint. The live status comes from the local API, as `unicity status` reads it.
func cmdAwaitRenewal(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) < 4 || len(args) > 5 {
		ts.Fatalf("usage: awaitrenewal STATEDIR RUNDIR VIA VAR [NOT]")
	}
	stateDir, via := ts.MkAbs(args[0]), args[2]
	cfg := config.Default()
	cfg.Runtime.Dir = ts.MkAbs(args[1])
	api := localapi.NewClient(&cfg)
	var not string
	if len(args) == 5 {
		not = args[4]
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var thumb, last string
	err := poll.Until(ctx, 50*time.Millisecond, func() bool {
		s, err := api.Status(ctx)
		if err != nil {
			last = err.Error()
			return false
		}
		rn := s.Renewal
		if s.Phase != device.PhaseConnected || s.Credential != device.CredentialOperational || rn == nil || rn.State != device.RenewalScheduled ||
			rn.Last == nil || rn.Last.Result != storage.Renewed || rn.Last.Via != via || strings.EqualFold(rn.Last.Thumbprint, not) {
			last = fmt.Sprintf("phase %s, credential %s, renewal %s", s.Phase, s.Credential, renewalOf(rn))
			return false
		}
		st, op, err := storedInUse(ts, stateDir)
		switch {
		case err != nil:
			last = err.Error()
			return false
		case st.Renewal != nil:
			last = "a renewed certificate on trial"
			return false
		case !strings.EqualFold(op.SHA256Thumbprint, rn.Last.Thumbprint):
			ts.Fatalf("the agent renewed into %s, the state stores %s", rn.Last.Thumbprint, op.SHA256Thumbprint)
		}
		thumb = op.SHA256Thumbprint
		return true
	})
	if err != nil {
		ts.Fatalf("no certificate renewed through %s in use: %s", via, last)
	}
	ts.Setenv(args[3], thumb)
}

func renewalOf(rn *device.RenewalStatus) string {
	b, _ := json.Marshal(rn)
	return string(b)
}

// cmdAwaitTwin: awaittwin STATEDIR DEVICE [REGEXP]. The agent reports as a connection comes
// up, a moment after the status says connected, and the renewal state as it changes.
func cmdAwaitTwin(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) < 2 || len(args) > 3 {
		ts.Fatalf("usage: awaittwin STATEDIR DEVICE [REGEXP]")
	}
	op := storedCertificate(ts, args[0])
	want := regexp.MustCompile("")
	if len(args) == 3 {
		var err error
		want, err = regexp.Compile(args[2])
		ts.Check(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), harnessWait)
	defer cancel()
	var last string
	err := poll.Until(ctx, 100*time.Millisecond, func() bool {
		ts.Check(ts.Exec("unicity-emulator", "twin", "--dir", ts.Getenv("EMU_DIR"), "--device", args[1]))
		var twin struct {
			Reported struct {
				Unicity struct {
					ValidFrom  time.Time `json:"validFrom"`
					ValidUntil time.Time `json:"validUntil"`
				} `json:"unicity"`
			} `json:"reported"`
		}
		last = ts.ReadFile("stdout")
		ts.Check(json.Unmarshal([]byte(last), &twin))
		u := twin.Reported.Unicity
		return u.ValidFrom.Equal(op.NotBefore) && u.ValidUntil.Equal(op.NotAfter) && want.MatchString(last)
	})
	if err != nil {
		ts.Fatalf("the twin does not report %s to %s (%s), matching %q: %s", op.NotBefore, op.NotAfter, op.SHA256Thumbprint, want, last)
	}
}

// cmdAwaitExpiry: awaitexpiry STATEDIR, the device being offline.
func cmdAwaitExpiry(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 1 {
		ts.Fatalf("usage: awaitexpiry STATEDIR")
	}
	op := storedCertificate(ts, args[0])
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := poll.Until(ctx, 100*time.Millisecond, func() bool { return time.Now().After(op.NotAfter) }); err != nil {
		ts.Fatalf("%s is valid until %s", op.SHA256Thumbprint, op.NotAfter)
	}
}

// storedCertificate is the operational certificate stored in dir.
func storedCertificate(ts *testscript.TestScript, dir string) *device.CertificateInfo {
	_, op, err := storedInUse(ts, ts.MkAbs(dir))
	ts.Check(err)
	return op
}

// storedInUse is the state in dir and its operational certificate, an error when it has none
// yet; a certificate whose key is missing fails the script.
func storedInUse(ts *testscript.TestScript, dir string) (*storage.State, *device.CertificateInfo, error) {
	st, err := storage.New(dir).Load()
	if err != nil {
		return nil, nil, err
	}
	op, err := device.StoredOperational(st, time.Now())
	if err != nil || op == nil {
		return nil, nil, fmt.Errorf("no operational certificate stored (%v)", err)
	}
	if _, err := os.Stat(ts.MkAbs(strings.TrimPrefix(op.Key, "tpmkey:"))); err != nil {
		ts.Fatalf("the stored operational key: %v", err)
	}
	return st, op, nil
}

func cmdExpand(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 2 {
		ts.Fatalf("usage: expand SRC DST")
	}
	out := os.Expand(ts.ReadFile(args[0]), ts.Getenv)
	ts.Check(os.WriteFile(ts.MkAbs(args[1]), []byte(out), 0o600))
}
