package faultnet_test

import (
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/unicity-iot/unicity/internal/faultnet"
	"github.com/unicity-iot/unicity/internal/pki"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// echo serves connections that send back what they read.
func echo(t *testing.T, wrap func(net.Conn) net.Conn) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.Copy(wrap(c), wrap(c))
			}()
		}
	}()
	t.Cleanup(func() { ln.Close(); <-done })
	return ln.Addr().String()
}

func plain(c net.Conn) net.Conn { return c }

func proxy(t *testing.T, target string) *faultnet.Proxy {
	p, err := faultnet.Listen(target)
	require.NoError(t, err)
	t.Cleanup(func() { p.Close() })
	return p
}

// exchange writes msg and reads what comes back until len(msg) bytes, an error or 2 s.
func exchange(t *testing.T, c net.Conn, msg []byte) ([]byte, error) {
	t.Helper()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Write(msg); err != nil {
		return nil, err
	}
	got := make([]byte, len(msg))
	n, err := io.ReadFull(c, got)
	return got[:n], err
}

func TestPassThrough(t *testing.T) {
	p := proxy(t, echo(t, plain))
	c, err := net.Dial("tcp", p.Addr())
	require.NoError(t, err)
	defer c.Close()
	msg := bytes.Repeat([]byte("abc"), 50000)
	got, err := exchange(t, c, msg)
	require.NoError(t, err)
	assert.Equal(t, msg, got)
	assert.Empty(t, p.Fired())
}

func TestFaults(t *testing.T) {
	msg := []byte("0123456789abcdefghij")
	tests := []struct {
		name    string
		fault   faultnet.Fault
		wantGot string
		check   func(t *testing.T, err error)
	}{
		{"drop at accept", faultnet.Fault{Action: faultnet.Drop}, "", isEOF},
		{"reset at accept", faultnet.Fault{Action: faultnet.Reset}, "", isReset},
		{"stall at accept", faultnet.Fault{Action: faultnet.Stall}, "", isTimeout},
		{"drop after 5 bytes down", faultnet.Fault{Direction: faultnet.Down, AfterBytes: 5, Action: faultnet.Drop}, "01234", isEOF},
		{"stall after 7 bytes down", faultnet.Fault{Direction: faultnet.Down, AfterBytes: 7, Action: faultnet.Stall}, "0123456", isTimeout},
		{"reset after 3 bytes up", faultnet.Fault{Direction: faultnet.Up, AfterBytes: 3, Action: faultnet.Reset}, "012", isReset},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := proxy(t, echo(t, plain))
			p.Inject(tt.fault)
			var got []byte
			c, err := net.Dial("tcp", p.Addr())
			if err == nil { // a reset at accept may already fail the dial
				defer c.Close()
				got, err = exchange(t, c, msg)
			}
			require.Error(t, err)
			tt.check(t, err)
			// A reset can overtake bytes already in flight to the client: a prefix at most.
			assert.True(t, bytes.HasPrefix([]byte(tt.wantGot), got), "got %q, want a prefix of %q", got, tt.wantGot)
			if tt.fault.Action != faultnet.Reset {
				assert.Equal(t, tt.wantGot, string(got))
			}
			assert.Equal(t, []faultnet.Fault{tt.fault}, p.Fired())
		})
	}
}

// isEOF: a close, which the kernel sends as a RST when the client's bytes were still unread.
func isEOF(t *testing.T, err error) {
	assert.True(t, errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET), "close: %v", err)
}

func isReset(t *testing.T, err error) {
	assert.True(t, errors.Is(err, syscall.ECONNRESET) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF), "reset: %v", err)
}

func isTimeout(t *testing.T, err error) {
	assert.ErrorIs(t, err, os.ErrDeadlineExceeded, "silence, no FIN")
}

func TestFaultOnLaterConnection(t *testing.T) {
	p := proxy(t, echo(t, plain))
	p.Inject(faultnet.Fault{Conn: 2, Action: faultnet.Drop})
	for i, wantErr := range []bool{false, true, false} {
		c, err := net.Dial("tcp", p.Addr())
		require.NoError(t, err)
		_, err = exchange(t, c, []byte("ping"))
		c.Close()
		assert.Equal(t, wantErr, err != nil, "connection %d: %v", i+1, err)
	}
	assert.Equal(t, 3, p.Accepted())
	assert.Zero(t, p.Pending())
}

// TestAfterTLSRecords counts the handshake's records: with the first two of the server's
// flights let through, the handshake cannot finish.
func TestAfterTLSRecords(t *testing.T) {
	ca, err := pki.NewRoot("faultnet test")
	require.NoError(t, err)
	leaf, err := ca.IssueServer([]string{"localhost"})
	require.NoError(t, err)
	cert := leaf.TLSCertificate()
	srvConf := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	tlsTarget := echoTLS(t, srvConf)

	for _, records := range []int{1, 2} {
		p := proxy(t, tlsTarget)
		p.Inject(faultnet.Fault{Direction: faultnet.Down, AfterRecords: records, Action: faultnet.Reset})
		c, err := tls.Dial("tcp", p.Addr(), &tls.Config{ServerName: "localhost", RootCAs: ca.Pool(), MinVersion: tls.VersionTLS12})
		if err == nil {
			c.Close()
		}
		require.Error(t, err, "after %d records", records)
		require.Len(t, p.Fired(), 1)
	}

	p := proxy(t, tlsTarget)
	p.Inject(faultnet.Fault{Direction: faultnet.Up, AfterRecords: 1000, Action: faultnet.Drop})
	c, err := tls.Dial("tcp", p.Addr(), &tls.Config{ServerName: "localhost", RootCAs: ca.Pool(), MinVersion: tls.VersionTLS12})
	require.NoError(t, err, "far-off record count lets the handshake through")
	got, err := exchange(t, c, []byte("hello"))
	require.NoError(t, err)
	assert.Equal(t, "hello", string(got))
	c.Close()
	assert.Empty(t, p.Fired())
}

func echoTLS(t *testing.T, conf *tls.Config) string {
	ln, err := tls.Listen("tcp", "127.0.0.1:0", conf)
	require.NoError(t, err)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	}()
	t.Cleanup(func() { ln.Close(); <-done })
	return ln.Addr().String()
}

func TestRetargetAndCloseConns(t *testing.T) {
	first, second := echo(t, plain), echo(t, plain)
	p := proxy(t, first)
	c, err := net.Dial("tcp", p.Addr())
	require.NoError(t, err)
	defer c.Close()
	_, err = exchange(t, c, []byte("x"))
	require.NoError(t, err)
	p.SetTarget(second)
	p.CloseConns()
	_, err = exchange(t, c, []byte("y"))
	require.Error(t, err, "open connections end")
	c2, err := net.Dial("tcp", p.Addr())
	require.NoError(t, err)
	defer c2.Close()
	got, err := exchange(t, c2, []byte("z"))
	require.NoError(t, err)
	assert.Equal(t, "z", string(got))
}
