package hub

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/internal/version"
)

func TestUsername(t *testing.T) {
	version.Version = "1.2.3"
	t.Cleanup(func() { version.Version = "dev" })
	tests := []struct {
		name, hub, device, model, want string
	}{
		{"plain", "myiothub.azure-devices.net", "my_device", "",
			"myiothub.azure-devices.net/my_device/?api-version=2021-04-12&DeviceClientType=unicity%2F1.2.3"},
		// protocol.md §5.9: the model ID vector of the Embedded C SDK.
		{"model id", "myiothub.azure-devices.net", "my_device", "dtmi:YOUR_COMPANY_NAME_HERE:sample_device;1",
			"myiothub.azure-devices.net/my_device/?api-version=2021-04-12&DeviceClientType=unicity%2F1.2.3&model-id=dtmi%3AYOUR_COMPANY_NAME_HERE%3Asample_device%3B1"},
		{"emulator port kept verbatim", "localhost:8884", "gw-1", "",
			"localhost:8884/gw-1/?api-version=2021-04-12&DeviceClientType=unicity%2F1.2.3"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, Username(tt.hub, tt.device, tt.model))
		})
	}
}

func TestEventsTopic(t *testing.T) {
	tests := []struct {
		name  string
		props map[string]string
		want  string
	}{
		{"no properties", nil, "devices/my_device/messages/events/"},
		// protocol.md §5.9.
		{"application", map[string]string{"key": "value", "key_two": "value2"},
			"devices/my_device/messages/events/key=value&key_two=value2"},
		// protocol.md §5.3: the docs' example, '$' sent as %24.
		{"system first, encoded", map[string]string{"b": "x y", "$.ct": "application/json;charset=utf-8", "$.ce": "utf-8"},
			"devices/my_device/messages/events/%24.ce=utf-8&%24.ct=application%2Fjson%3Bcharset%3Dutf-8&b=x%20y"},
		{"reserved characters", map[string]string{"a&b": "c=d", "plus": "1+1"},
			"devices/my_device/messages/events/a%26b=c%3Dd&plus=1%2B1"},
		{"empty value", map[string]string{"flag": ""}, "devices/my_device/messages/events/flag="},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, eventsTopic("my_device", tt.props))
		})
	}
}

func TestDecodeProperties(t *testing.T) {
	tests := []struct {
		name, bag string
		want      map[string]string
	}{
		{"empty", "", nil},
		// protocol.md §5.4, the Embedded C SDK's vector.
		{"c sdk", "%24.to=%2Fdevices%2Fuseragent_c%2Fmessages%2FdeviceBound&abc=123&ghi=%2Fsome%2Fthing&jkl=%2Fsome%2Fthing%2F%3Fbla%3Dbla",
			map[string]string{"$.to": "/devices/useragent_c/messages/deviceBound", "abc": "123", "ghi": "/some/thing", "jkl": "/some/thing/?bla=bla"}},
		{"null and empty values", "a&b=", map[string]string{"a": "", "b": ""}},
		{"trailing slash of the C# SDK", "%24.mid=x&a=b/", map[string]string{"$.mid": "x", "a": "b"}},
		{"plus stays a plus", "a=1+1", map[string]string{"a": "1+1"}},
		{"malformed escape kept", "a=100%", map[string]string{"a": "100%"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, DecodeProperties(tt.bag))
		})
	}
}

func TestPropertiesRoundTrip(t *testing.T) {
	props := map[string]string{"$.ct": "application/json", "ünï": "çödé & = / ? %", "": "x"}
	delete(props, "")
	topic := eventsTopic("d", props)
	assert.Equal(t, props, DecodeProperties(strings.TrimPrefix(topic, "devices/d/messages/events/")))
}

func TestConnectError(t *testing.T) {
	for rc := byte(1); rc <= 5; rc++ {
		err := error(&ConnectError{ReturnCode: rc})
		assert.Equal(t, rc == 4 || rc == 5, errors.Is(err, ErrNotAuthorized), "code %d", rc)
		assert.Equal(t, rc == 3, err.(*ConnectError).Temporary(), "code %d", rc)
		assert.Contains(t, err.Error(), "CONNACK")
	}
}

func TestQueueBounds(t *testing.T) {
	tests := []struct {
		name            string
		count, bytes    int
		sizes           []int
		wantQueued      int
		wantRefusedSize int
	}{
		{"by count", 2, 1 << 20, []int{1, 1, 1}, 2, 1},
		{"by bytes", 100, 100, []int{60, 30, 20}, 2, 20},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			q := NewQueue(tt.count, tt.bytes)
			var err error
			for _, n := range tt.sizes {
				if _, err = q.Enqueue(Message{Payload: make([]byte, n)}); err != nil {
					break
				}
			}
			require.ErrorIs(t, err, ErrQueueFull)
			n, _ := q.Len()
			assert.Equal(t, tt.wantQueued, n)
		})
	}
	_, err := NewQueue(0, 0).Enqueue(Message{Payload: make([]byte, MaxTelemetrySize+1)})
	assert.ErrorIs(t, err, ErrTooLarge)
}

func TestQueueOrderAndRequeue(t *testing.T) {
	q := NewQueue(0, 0)
	var acks []<-chan struct{}
	for i := range 3 {
		ch, err := q.Enqueue(Message{Payload: []byte{byte(i)}})
		require.NoError(t, err)
		acks = append(acks, ch)
	}
	ctx := context.Background()
	stop := make(chan struct{})
	e0, _ := q.next(ctx, stop)
	e1, _ := q.next(ctx, stop)
	assert.Equal(t, []byte{0}, e0.msg.Payload)
	assert.Equal(t, []byte{1}, e1.msg.Payload)
	q.ack(e1) // acknowledged out of order: fine
	q.requeue()
	again, _ := q.next(ctx, stop)
	assert.Equal(t, []byte{0}, again.msg.Payload, "the unacknowledged message goes first after a reconnect")
	third, _ := q.next(ctx, stop)
	assert.Equal(t, []byte{2}, third.msg.Payload)
	select {
	case <-acks[1]:
	default:
		t.Fatal("acknowledged message not reported")
	}
	close(stop)
	_, ok := q.next(ctx, stop)
	assert.False(t, ok)
}

func TestSendWithdrawsOnCancel(t *testing.T) {
	q := NewQueue(0, 0)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	err := q.Send(ctx, Message{Payload: []byte("x")})
	require.ErrorIs(t, err, context.Canceled)
	assert.Contains(t, err.Error(), "not sent")
	n, _ := q.Len()
	assert.Zero(t, n, "a message never handed to a connection is taken back")
}
