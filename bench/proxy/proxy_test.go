package proxy

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/attest/attesttest"
	"github.com/unicity-iot/unicity/internal/pki"
)

// TestTCPCountsTLS puts the proxy between a TLS 1.2 client and a TLS echo server and checks
// that every byte arrives and is counted, records by type. (In TLS 1.3 the handshake after
// ServerHello travels in application-data records.)
func TestTCPCountsTLS(t *testing.T) {
	ca, err := pki.NewRoot("proxy test root")
	require.NoError(t, err)
	leaf, err := ca.IssueServer([]string{"127.0.0.1"})
	require.NoError(t, err)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{leaf.TLSCertificate()}})
	require.NoError(t, err)
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 1024)
				for {
					n, err := c.Read(buf)
					if err != nil {
						return
					}
					c.Write(buf[:n])
				}
			}()
		}
	}()

	p, err := ListenTCP("127.0.0.1:0", ln.Addr().String())
	require.NoError(t, err)
	defer p.Close()

	raw, err := net.Dial("tcp", p.Addr())
	require.NoError(t, err)
	counted := &countingConn{Conn: raw}
	c := tls.Client(counted, &tls.Config{RootCAs: ca.Pool(), ServerName: "127.0.0.1", MaxVersion: tls.VersionTLS12})
	const messages = 3
	for i := range messages {
		msg := bytes.Repeat([]byte{byte('a' + i)}, 100)
		_, err := c.Write(msg)
		require.NoError(t, err)
		got := make([]byte, len(msg))
		_, err = io.ReadFull(c, got)
		require.NoError(t, err)
		assert.Equal(t, msg, got)
	}
	require.NoError(t, c.Close())

	// The counters settle once the server's side has closed too.
	require.Eventually(t, func() bool {
		n := p.Counts()
		return n.Up.Bytes == counted.written && n.Down.Bytes >= counted.read && n.Up.Records[RecordAlert] == 1
	}, 5e9, 1e7, "counts %+v, client wrote %d, read %d", p.Counts(), counted.written, counted.read)
	n := p.Counts()
	assert.Equal(t, 1, n.Connections)
	assert.Equal(t, messages, n.Up.AppRecords())
	assert.Equal(t, messages, n.Down.AppRecords())
	assert.Positive(t, n.Up.Records[RecordHandshake])
	assert.Positive(t, n.Down.Records[RecordHandshake])
}

type countingConn struct {
	net.Conn
	written, read int64
}

func (c *countingConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	c.written += int64(n)
	return n, err
}

func (c *countingConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.read += int64(n)
	return n, err
}

// TestRecordAndCommandFraming feeds the framing parsers a stream one byte at a time.
func TestRecordAndCommandFraming(t *testing.T) {
	t.Run("TLS records", func(t *testing.T) {
		var stream []byte
		for _, r := range []struct {
			typ byte
			n   int
		}{{RecordHandshake, 70}, {RecordApplicationData, 0}, {RecordApplicationData, 300}, {RecordAlert, 2}} {
			stream = append(stream, r.typ, 3, 3, byte(r.n>>8), byte(r.n))
			stream = append(stream, make([]byte, r.n)...)
		}
		var rc recordCounter
		counts := map[byte]int{}
		for i := range stream {
			rc.feed(stream[i:i+1], counts)
		}
		assert.Equal(t, map[byte]int{RecordHandshake: 1, RecordApplicationData: 2, RecordAlert: 1}, counts)
	})
	t.Run("TPM commands", func(t *testing.T) {
		var stream []byte
		for _, c := range []struct {
			code uint32
			body int
		}{{CCSign, 40}, {0x165, 4}, {CCSign, 0}} {
			h := make([]byte, 10)
			binary.BigEndian.PutUint16(h, 0x8001)
			binary.BigEndian.PutUint32(h[2:], uint32(10+c.body))
			binary.BigEndian.PutUint32(h[6:], c.code)
			stream = append(append(stream, h...), make([]byte, c.body)...)
		}
		var cc commandCounter
		counts := TPMCounts{ByCode: map[uint32]int{}}
		for i := range stream {
			cc.feed(stream[i:i+1], &counts)
		}
		assert.Equal(t, 3, counts.Commands)
		assert.Equal(t, map[uint32]int{CCSign: 2, 0x165: 1}, counts.ByCode)
	})
}

// TestTPMCountsCommands sends real commands to swtpm through the proxy.
func TestTPMCountsCommands(t *testing.T) {
	sock := attesttest.StartSWTPM(t)
	dir, err := os.MkdirTemp("", "tpmproxy")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	p, err := ListenTPM(filepath.Join(dir, "counted.sock"), sock)
	require.NoError(t, err)
	defer p.Close()

	tpm, err := attest.OpenTPM(context.Background(), "swtpm:"+p.Path())
	require.NoError(t, err)
	for range 2 {
		rsp, err := tpm2.GetRandom{BytesRequested: 8}.Execute(tpm)
		require.NoError(t, err)
		assert.Len(t, rsp.RandomBytes.Buffer, 8)
	}
	_, err = tpm2.ReadClock{}.Execute(tpm)
	require.NoError(t, err)
	require.NoError(t, tpm.Close())

	// Opening swtpm (no resource manager) lists its transient objects and loaded sessions.
	n := p.Counts()
	assert.Equal(t, 5, n.Commands)
	assert.Equal(t, map[uint32]int{uint32(tpm2.TPMCCGetCapability): 2, uint32(tpm2.TPMCCGetRandom): 2, uint32(tpm2.TPMCCReadClock): 1}, n.ByCode)
}
