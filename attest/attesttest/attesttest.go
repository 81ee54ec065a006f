// Package attesttest gives tests a TPM: the in-process reference simulator, a private swtpm
// process, or a TPM that stops answering (Wedge). It links the cgo simulator, so shipped code never imports it.
package attesttest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-tpm-tools/simulator"
	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/unicity-iot/unicity/attest"
)

// Strict reports whether missing test tools are failures rather than skips (CI sets
// UNICITY_TEST_STRICT=1, so CI cannot pass by skipping).
func Strict() bool { return os.Getenv("UNICITY_TEST_STRICT") == "1" }

// RequireTool returns the path of an external program, skipping the test when it is missing
// (failing it in strict mode).
func RequireTool(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		if Strict() {
			t.Fatalf("%s is required (UNICITY_TEST_STRICT=1): %v", name, err)
		}
		t.Skipf("%s not installed: %v", name, err)
	}
	return p
}

// Simulator returns a freshly manufactured in-process reference TPM, locked for concurrent
// use and closed when the test ends. The simulator is a process-wide singleton: a second
// Simulator call waits until the first test ends, so tests using it must not be parallel.
func Simulator(t testing.TB) transport.TPMCloser {
	t.Helper()
	sim, err := simulator.Get()
	if err != nil {
		// Without cgo the simulator is a stub that fails here.
		if Strict() {
			t.Fatalf("cannot start the TPM simulator (UNICITY_TEST_STRICT=1): %v", err)
		}
		t.Skipf("TPM simulator unavailable: %v", err)
	}
	tpm := attest.Locked(transport.FromReadWriteCloser(sim))
	t.Cleanup(func() { tpm.Close() })
	return tpm
}

// SWTPM starts a private swtpm for the test and returns it opened through attest.OpenTPM.
func SWTPM(t testing.TB) transport.TPMCloser {
	t.Helper()
	sock := StartSWTPM(t)
	tpm, err := attest.OpenTPM(context.Background(), "swtpm:"+sock)
	if err != nil {
		t.Fatalf("cannot open swtpm: %v", err)
	}
	t.Cleanup(func() { tpm.Close() })
	return tpm
}

// StartSWTPM starts a private swtpm (skipping the test when swtpm is missing, unless strict)
// and returns its unix data socket. The control socket is at socket+".ctrl", where the tpm2
// TCTI (tpm2-tools, tpm2-openssl: swtpm:path=SOCKET) expects it. swtpm serves one client at a
// time: close a connection before another program uses the TPM.
func StartSWTPM(t testing.TB) string {
	t.Helper()
	return SWTPMProcess(t).Addr
}

// SWTPMProcess is StartSWTPM for tests that stop swtpm and start it again on the same state
// (Restart): a TPM reset, or a TPM that is not there for a while.
func SWTPMProcess(t testing.TB) *Process {
	t.Helper()
	bin := RequireTool(t, "swtpm")
	// Not t.TempDir: a unix socket path must stay under 108 bytes, and test names are long.
	dir, err := os.MkdirTemp("", "swtpm")
	if err != nil {
		t.Fatal(err)
	}
	p, err := Start(bin, dir)
	if err != nil {
		os.RemoveAll(dir)
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.Stop()
		os.RemoveAll(dir)
	})
	return p
}

// Process is a running swtpm.
type Process struct {
	// Addr is the data socket's path, or HOST:PORT over TCP: "swtpm:"+Addr opens it. A unix
	// control socket is at Addr+".ctrl", a TCP one on the next port, where the tpm2 TCTI
	// (swtpm:path=… or swtpm:host=…,port=…) expects them.
	Addr   string
	args   []string // bin, dir, server, ctrl: what Restart starts again
	cmd    *exec.Cmd
	exited chan error
}

// Start runs swtpm on unix sockets with its state and log in dir and waits until it listens.
// It is for harnesses that manage lifetimes themselves (testscript); tests use StartSWTPM.
func Start(bin, dir string) (*Process, error) {
	sock := filepath.Join(dir, "swtpm.sock")
	return start(bin, dir, sock, "type=unixio,path="+sock, "type=unixio,path="+sock+".ctrl")
}

// StartTCP runs swtpm on 127.0.0.1:port (control on port+1) with its state in dir.
func StartTCP(bin, dir string, port int) (*Process, error) {
	return start(bin, dir, fmt.Sprintf("127.0.0.1:%d", port),
		fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", port),
		fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", port+1))
}

func start(bin, dir, addr, server, ctrl string) (*Process, error) {
	p := &Process{Addr: addr, args: []string{bin, dir, server, ctrl}, exited: make(chan error, 1)}
	logPath := filepath.Join(dir, "swtpm.log")
	p.cmd = exec.Command(bin, "socket", "--tpm2",
		"--tpmstate", "dir="+dir,
		"--server", server,
		"--ctrl", ctrl,
		"--flags", "not-need-init,startup-clear",
		"--log", "file="+logPath+",level=1")
	if err := p.cmd.Start(); err != nil {
		return nil, err
	}
	go func() { p.exited <- p.cmd.Wait() }()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	deadline := time.After(10 * time.Second)
	for {
		if p.listening() {
			return p, nil
		}
		select {
		case err := <-p.exited:
			p.exited <- err
			log, _ := os.ReadFile(logPath)
			return nil, errors.Join(errors.New("swtpm exited at start: "+string(log)), err)
		case <-deadline:
			p.Stop()
			return nil, errors.New("swtpm did not listen within 10s")
		case <-tick.C:
		}
	}
}

// listening probes the data socket. (The socket file exists before swtpm listens on it.)
func (p *Process) listening() bool {
	network := "tcp"
	if strings.HasPrefix(p.Addr, "/") {
		network = "unix"
	}
	c, err := net.Dial(network, p.Addr)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

// Restart starts swtpm again, once stopped, on the state and addresses it had.
func (p *Process) Restart() error {
	q, err := start(p.args[0], p.args[1], p.Addr, p.args[2], p.args[3])
	if err != nil {
		return err
	}
	*p = *q
	return nil
}

// WedgeProxy stands between a TPM's users and swtpm on a unix socket, Sock. While Wedged is
// set it takes commands and answers none, as a wedged driver or an swtpm held by another
// client does. Each connection's upstream is closed with it, so that swtpm serves the next.
type WedgeProxy struct {
	Sock   string
	Wedged atomic.Bool
	// Swallowed counts the reads of commands that were not passed on: a program waiting on
	// the TPM has sent one.
	Swallowed atomic.Int64
}

// Spec is the TPM spec ([tpm] device, --tpm) that opens the TPM through the proxy.
func (p *WedgeProxy) Spec() string { return "swtpm:" + p.Sock }

// Wedge starts a WedgeProxy to swtpm's data socket upstream, or, with upstream empty, to
// nothing: a TPM that never answers.
func Wedge(t testing.TB, upstream string) *WedgeProxy {
	t.Helper()
	dir, err := os.MkdirTemp("", "wedge") // a socket path must stay under 108 bytes
	if err != nil {
		t.Fatal(err)
	}
	p := &WedgeProxy{Sock: filepath.Join(dir, "tpm.sock")}
	ln, err := net.Listen("unix", p.Sock)
	if err != nil {
		os.RemoveAll(dir)
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
		os.RemoveAll(dir)
	})
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() { p.serve(c, upstream) })
		}
	})
	return p
}

// SilentTPM is a TPM that takes connections and commands and answers none.
func SilentTPM(t testing.TB) *WedgeProxy {
	t.Helper()
	return Wedge(t, "")
}

func (p *WedgeProxy) serve(c net.Conn, upstream string) {
	defer c.Close()
	var up net.Conn
	if upstream != "" {
		var err error
		if up, err = net.Dial("unix", upstream); err != nil {
			return
		}
		defer up.Close()
		go io.Copy(c, up)
	}
	buf := make([]byte, 4096)
	for {
		n, err := c.Read(buf)
		if err != nil {
			return
		}
		if up == nil || p.Wedged.Load() {
			p.Swallowed.Add(1)
			continue
		}
		up.Write(buf[:n])
	}
}

// Stop kills swtpm (our own child, by PID) and waits for it to exit.
func (p *Process) Stop() {
	_ = p.cmd.Process.Kill()
	err := <-p.exited
	p.exited <- err
}

// LoadedHandles lists the transient objects and the sessions the TPM holds: what a test of
// leaks expects empty.
func LoadedHandles(t testing.TB, tpm transport.TPM) []tpm2.TPMHandle {
	t.Helper()
	var all []tpm2.TPMHandle
	for _, first := range []uint32{0x80000000, 0x02000000, 0x03000000} {
		r, err := tpm2.GetCapability{Capability: tpm2.TPMCapHandles, Property: first, PropertyCount: 64}.Execute(tpm)
		if err != nil {
			t.Fatalf("cannot list the TPM's handles: %v", err)
		}
		h, err := r.CapabilityData.Data.Handles()
		if err != nil {
			t.Fatalf("cannot list the TPM's handles: %v", err)
		}
		for _, x := range h.Handle {
			if uint32(x)>>24 == first>>24 {
				all = append(all, x)
			}
		}
	}
	return all
}

// LoadedInSWTPM lists what LoadedHandles does in the swtpm serving sock (a path, or
// "swtpm:" and a path), over a bare connection: attest.OpenTPM would flush it first. The
// swtpm must be free (no program holding it).
func LoadedInSWTPM(t testing.TB, sock string) []tpm2.TPMHandle {
	t.Helper()
	conn, err := net.Dial("unix", strings.TrimPrefix(sock, "swtpm:"))
	if err != nil {
		t.Fatalf("cannot reach swtpm: %v", err)
	}
	tpm := transport.FromReadWriteCloser(conn)
	defer tpm.Close()
	return LoadedHandles(t, tpm)
}
