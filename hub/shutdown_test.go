package hub_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"io"
	"net"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/hub"
	"github.com/unicity-iot/unicity/hub/hubtest"
)

// TestRunStopsPromptlyOnADeadLink: when the link dies under a telemetry stream (the peer
// stops taking bytes, so the socket buffers fill), paho's writer blocks and the call handing
// it the next message waits for paho's WriteTimeout (30 s by default). Cancelling Run must
// not wait for that call: the agent has 5 s to stop on SIGTERM.
func TestRunStopsPromptlyOnADeadLink(t *testing.T) {
	// Whether paho's stuck call outlives the connection's end is a race inside paho (about
	// one run in four without the fix), hence several rounds.
	for round := range 8 {
		t.Run(itoa(round), stopOnDeadLink)
	}
}

func stopOnDeadLink(t *testing.T) {
	const budget = 5 * time.Second
	link := newChokeLink(t)
	srv := hubtest.NewServer(t, hubtest.WithHostNames(link.name))
	link.start(srv.Addr)
	ca := newDeviceCA(t)
	cfg := config(srv, "gw-stop", ca.softwareDevice(t, srv.Hub, "gw-stop"))
	cfg.Hub = link.name
	cfg.WriteTimeout = 0 // the default, far longer than the budget
	// More than the socket buffers take (a few megabytes) within the in-flight window.
	cfg.Queue = hub.NewQueue(0, 64<<20)
	c, err := hub.New(cfg)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	wait := testContext(t)
	require.NoError(t, c.AwaitConnection(wait))
	require.NoError(t, c.Send(wait, hub.Message{Payload: []byte("before")}))

	link.choke()
	payload := bytes.Repeat([]byte("x"), 250<<10)
	for {
		if _, err := c.Queue().Enqueue(hub.Message{Payload: payload}); err != nil {
			require.ErrorIs(t, err, hub.ErrQueueFull)
			break
		}
	}
	awaitBlockedPublish(t)

	cancel()
	start := time.Now()
	select {
	case err := <-done:
		assert.ErrorIs(t, err, context.Canceled)
		assert.Less(t, time.Since(start), budget, "Run returned late after cancel")
	case <-time.After(hub.DefaultWriteTimeout + 10*time.Second):
		t.Fatal("Run did not return after cancel")
	}
}

// chokeLink forwards one client's connection to target until choked; then it reads nothing
// more from the client, as a dead link does once the client's unacknowledged bytes fill its
// socket buffer. (faultnet's Stall reads and discards what is sent, so writers never block.)
type chokeLink struct {
	name   string // "localhost:port", a name the hub answers to
	target string
	l      net.Listener
	choked chan struct{}
	quit   chan struct{}
	wg     sync.WaitGroup
}

func newChokeLink(t *testing.T) *chokeLink {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	_, port, _ := net.SplitHostPort(l.Addr().String())
	k := &chokeLink{name: "localhost:" + port, l: l, choked: make(chan struct{}), quit: make(chan struct{})}
	t.Cleanup(func() {
		close(k.quit)
		l.Close()
		k.wg.Wait()
	})
	return k
}

// start forwards connections to target, the hub that answers to name.
func (k *chokeLink) start(target string) {
	k.target = target
	k.wg.Add(1)
	go k.serve()
}

func (k *chokeLink) serve() {
	defer k.wg.Done()
	for {
		in, err := k.l.Accept()
		if err != nil {
			return
		}
		out, err := net.Dial("tcp", k.target)
		if err != nil {
			in.Close()
			continue
		}
		in.(*net.TCPConn).SetReadBuffer(4096) // a small window fills at once
		k.wg.Add(3)
		go func() {
			defer k.wg.Done()
			<-k.quit
			in.Close()
			out.Close()
		}()
		go func() {
			defer k.wg.Done()
			io.Copy(in, out)
		}()
		go func() {
			defer k.wg.Done()
			buf := make([]byte, 1024)
			for {
				select {
				case <-k.choked:
					return // and never read again
				default:
				}
				n, err := in.Read(buf)
				if err != nil {
					return
				}
				if _, err := out.Write(buf[:n]); err != nil {
					return
				}
			}
		}()
	}
}

func (k *chokeLink) choke() { close(k.choked) }

// awaitBlockedPublish waits until a telemetry hand-off is stuck in paho's Publish behind the
// blocked writer, the situation under test: the same goroutine in Publish for 200 ms.
func awaitBlockedPublish(t *testing.T) {
	t.Helper()
	buf := make([]byte, 1<<22)
	publishing := func() map[string]bool {
		ids := map[string]bool{}
		for _, g := range strings.Split(string(buf[:runtime.Stack(buf, true)]), "\n\n") {
			if strings.Contains(g, ".(*client).Publish(") && strings.Contains(g, "hub.(*Client).handoff") {
				ids[strings.Fields(g)[1]] = true
			}
		}
		return ids
	}
	// Each check compares with the one before, 200 ms earlier: a goroutine in both is stuck.
	before := publishing()
	require.Eventually(t, func() bool {
		now := publishing()
		for id := range now {
			if before[id] {
				return true
			}
		}
		before = now
		return false
	}, 20*time.Second, 200*time.Millisecond, "no publish got stuck behind the dead link")
}

// TestRunStopsPromptlyWhileConnecting: a hub that completes TLS and then never answers
// CONNECT (a dead link after the handshake) holds paho for its connect timeout (30 s).
// Cancelling Run must end the attempt at once.
func TestRunStopsPromptlyWhileConnecting(t *testing.T) {
	const budget = 5 * time.Second
	srv := hubtest.NewServer(t)
	leaf, err := srv.CA.IssueServer([]string{"localhost"})
	require.NoError(t, err)
	l, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{leaf.TLSCertificate()}})
	require.NoError(t, err)
	got := make(chan struct{}, 1) // CONNECT bytes arrived
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				if _, err := c.Read(make([]byte, 1)); err != nil {
					return
				}
				select {
				case got <- struct{}{}:
				default:
				}
				io.Copy(io.Discard, c) // and never answer
			}()
		}
	}()
	t.Cleanup(func() {
		l.Close()
		wg.Wait()
	})
	_, port, _ := net.SplitHostPort(l.Addr().String())
	ca := newDeviceCA(t)
	cfg := config(srv, "gw-silent", ca.softwareDevice(t, srv.Hub, "gw-silent"))
	cfg.Hub = "localhost:" + port
	c, err := hub.New(cfg)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	select {
	case <-got:
	case <-testContext(t).Done():
		t.Fatal("no CONNECT sent")
	}

	cancel()
	start := time.Now()
	select {
	case err := <-done:
		assert.ErrorIs(t, err, context.Canceled)
		assert.Less(t, time.Since(start), budget, "Run returned late after cancel")
	case <-time.After(time.Minute):
		t.Fatal("Run did not return after cancel")
	}
}
