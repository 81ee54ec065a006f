package dial

import (
	"bytes"
	"io"
	"net"
	"testing"
	"testing/iotest"

	"github.com/eclipse/paho.mqtt.golang/packets"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func encode(t *testing.T, p packets.ControlPacket) []byte {
	t.Helper()
	var b bytes.Buffer
	require.NoError(t, p.Write(&b))
	return b.Bytes()
}

func publish(t *testing.T, size int) []byte {
	p := packets.NewControlPacket(packets.Publish).(*packets.PublishPacket)
	p.TopicName, p.Qos, p.MessageID, p.Payload = "$iothub/twin/res/200/?$rid=1", 1, 7, bytes.Repeat([]byte("x"), size)
	return encode(t, p)
}

// streamConn serves a fixed byte stream as a connection, a few bytes per Read.
type streamConn struct {
	net.Conn
	r      io.Reader
	closed bool
}

func (c *streamConn) Read(p []byte) (int, error) { return c.r.Read(p) }
func (c *streamConn) Close() error               { c.closed = true; return nil }

func TestLimitPassesPacketsWithinTheBound(t *testing.T) {
	var stream []byte
	stream = append(stream, encode(t, packets.NewControlPacket(packets.Connack))...)
	stream = append(stream, publish(t, 0)...)
	stream = append(stream, publish(t, 200)...)    // a two-byte remaining length
	stream = append(stream, publish(t, 20_000)...) // a three-byte one
	stream = append(stream, encode(t, packets.NewControlPacket(packets.Pingresp))...)

	for name, r := range map[string]io.Reader{
		"whole":        bytes.NewReader(stream),
		"byte by byte": iotest.OneByteReader(bytes.NewReader(stream)),
		"half by half": iotest.HalfReader(bytes.NewReader(stream)),
	} {
		t.Run(name, func(t *testing.T) {
			conn := limitPackets(&streamConn{r: r}, 20_100)
			var got []packets.ControlPacket
			for {
				p, err := packets.ReadPacket(conn)
				if err == io.EOF {
					break
				}
				require.NoError(t, err)
				got = append(got, p)
			}
			require.Len(t, got, 5)
			assert.Len(t, got[3].(*packets.PublishPacket).Payload, 20_000)
		})
	}
}

func TestLimitRefusesAnOversizedPacketBeforeItsBody(t *testing.T) {
	stream := append(encode(t, packets.NewControlPacket(packets.Pingresp)), publish(t, 2_000)...)
	sc := &streamConn{r: iotest.OneByteReader(bytes.NewReader(stream))}
	conn := limitPackets(sc, 1_000)

	_, err := packets.ReadPacket(conn)
	require.NoError(t, err, "the PINGRESP before it is within the bound")
	_, err = packets.ReadPacket(conn)
	require.ErrorIs(t, err, ErrPacketTooLarge)
	assert.ErrorContains(t, err, "accepted")
	assert.True(t, sc.closed, "the connection is closed: nothing after the header is read")
	_, err = conn.Read(make([]byte, 1))
	assert.ErrorIs(t, err, ErrPacketTooLarge, "and stays failed")
}

func TestLimitHeaderAnnouncing256MiB(t *testing.T) {
	// The largest length MQTT can encode, in a header alone: refused at the default bound.
	conn := limitPackets(&streamConn{r: bytes.NewReader([]byte{0x30, 0xff, 0xff, 0xff, 0x7f})}, 0)
	_, err := packets.ReadPacket(conn)
	require.ErrorIs(t, err, ErrPacketTooLarge)
	assert.ErrorContains(t, err, "268435455 bytes announced, 1048576 accepted")
}

func TestLimitMalformedLength(t *testing.T) {
	conn := limitPackets(&streamConn{r: bytes.NewReader([]byte{0x30, 0x80, 0x80, 0x80, 0x80, 0x01})}, 0)
	_, err := packets.ReadPacket(conn)
	require.ErrorIs(t, err, ErrPacketTooLarge)
	assert.ErrorContains(t, err, "malformed")
}
