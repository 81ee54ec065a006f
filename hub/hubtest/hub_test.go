package hubtest_test

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"net"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.mqtt.golang/packets"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/unicity-iot/unicity/hub/hubtest"
	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/internal/pki"
	"github.com/unicity-iot/unicity/sas"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestConnectAuthentication(t *testing.T) {
	f := newFixture(t)
	good := f.device(t, "dev-ca")

	otherRoot, err := pki.NewRoot("stranger root")
	require.NoError(t, err)
	stranger, err := otherRoot.NewDevice("dev-ca")
	require.NoError(t, err)
	strangerCert := stranger.TLSCertificate()

	wrongCN, err := f.factory.NewDevice("someone-else")
	require.NoError(t, err)
	wrongCNCert := wrongCN.TLSCertificate()

	self, err := otherRoot.NewDevice("dev-tp")
	require.NoError(t, err)
	selfCert := self.TLSCertificate()
	require.NoError(t, f.srv.Register(hubtest.Device{ID: "dev-tp", Thumbprints: []string{strings.ToLower(certcodec.Thumbprint(self.Certificate()))}}))

	key := []byte("0123456789abcdef0123456789abcdef")
	require.NoError(t, f.srv.Register(hubtest.Device{ID: "dev-sas", SymmetricKeys: [][]byte{[]byte("old key"), key}}))
	require.NoError(t, f.srv.Register(hubtest.Device{ID: "dev-off", SymmetricKeys: [][]byte{key}, Disabled: true}))
	sas := func(id string, k []byte, exp time.Duration) string {
		return sas.Token(k, f.srv.Name()+"/devices/"+id, time.Now().Add(exp), "")
	}

	for _, tc := range []struct {
		name string
		cfg  clientConfig
		want error // nil: accepted
	}{
		{"CA-signed", clientConfig{id: "dev-ca", cert: &good}, nil},
		{"thumbprint", clientConfig{id: "dev-tp", cert: &selfCert}, nil},
		{"SAS with secondary key", clientConfig{id: "dev-sas", password: sas("dev-sas", key, time.Hour)}, nil},
		{"SAS signed over lower-case escapes", clientConfig{id: "dev-sas", password: lowerCaseSAS(f.srv.Name(), "dev-sas", key)}, nil},
		{"username with extra keys in any order", clientConfig{id: "dev-ca", cert: &good,
			username: f.srv.Name() + "/dev-ca/?model-id=dtmi%3Ax%3B1&api-version=2020-09-30&x=y"}, nil},
		{"chain from another CA", clientConfig{id: "dev-ca", cert: &strangerCert}, packets.ErrorRefusedNotAuthorised},
		{"CN is not the device ID", clientConfig{id: "dev-ca", cert: &wrongCNCert}, packets.ErrorRefusedNotAuthorised},
		{"no certificate for an X.509 device", clientConfig{id: "dev-ca", password: "x"}, packets.ErrorRefusedNotAuthorised},
		{"thumbprint mismatch", clientConfig{id: "dev-tp", cert: &strangerCert}, packets.ErrorRefusedNotAuthorised},
		{"unknown device", clientConfig{id: "nobody", cert: &good}, packets.ErrorRefusedNotAuthorised},
		{"disabled device", clientConfig{id: "dev-off", password: sas("dev-off", key, time.Hour)}, packets.ErrorRefusedNotAuthorised},
		{"SAS expired", clientConfig{id: "dev-sas", password: sas("dev-sas", key, -time.Minute)}, packets.ErrorRefusedNotAuthorised},
		{"SAS wrong key", clientConfig{id: "dev-sas", password: sas("dev-sas", []byte("wrong"), time.Hour)}, packets.ErrorRefusedNotAuthorised},
		{"SAS for another device", clientConfig{id: "dev-sas", password: sas("dev-ca", key, time.Hour)}, packets.ErrorRefusedNotAuthorised},
		{"module identity", clientConfig{id: "dev-ca/mod", cert: &good,
			username: f.srv.Name() + "/dev-ca/mod/?api-version=2021-04-12"}, packets.ErrorRefusedNotAuthorised},
		{"username for another hub", clientConfig{id: "dev-ca", cert: &good,
			username: "other.azure-devices.net/dev-ca/?api-version=2021-04-12"}, packets.ErrorRefusedBadUsernameOrPassword},
		{"username without api-version", clientConfig{id: "dev-ca", cert: &good,
			username: f.srv.Name() + "/dev-ca/?DeviceClientType=x"}, packets.ErrorRefusedBadUsernameOrPassword},
		{"username without /?", clientConfig{id: "dev-ca", cert: &good,
			username: f.srv.Name() + "/dev-ca/api-version=2021-04-12"}, packets.ErrorRefusedBadUsernameOrPassword},
		{"client ID differs from username", clientConfig{id: "dev-tp", cert: &good,
			username: f.username("dev-ca")}, packets.ErrorRefusedBadUsernameOrPassword},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := f.srv.Stats()
			c, err := f.connect(t, tc.cfg)
			if tc.want == nil {
				require.NoError(t, err)
				c.Disconnect(0)
				assert.Equal(t, before.Connections+1, f.srv.Stats().Connections)
				return
			}
			assert.ErrorIs(t, err, tc.want)
			assert.Equal(t, before.Refused+1, f.srv.Stats().Refused)
			refusals := f.srv.Refusals()
			require.NotEmpty(t, refusals)
			last := refusals[len(refusals)-1]
			assert.Equal(t, tc.cfg.id, last.ClientID)
			assert.Equal(t, tc.want, packets.ConnErrors[last.ReturnCode])
			assert.NotEmpty(t, last.Reason)
		})
	}
}

// lowerCaseSAS signs over "%2f" escapes, as the Embedded C SDK does.
func lowerCaseSAS(hub, id string, key []byte) string {
	sr := strings.ReplaceAll(strings.ReplaceAll(hub+"/devices/"+id, "/", "%2f"), ":", "%3a")
	se := strconv.FormatInt(time.Now().Add(time.Hour).Unix(), 10)
	mac := hmac.New(sha256.New, key)
	mac.Write([]byte(sr + "\n" + se))
	sig := url.QueryEscape(base64.StdEncoding.EncodeToString(mac.Sum(nil)))
	return "SharedAccessSignature sr=" + sr + "&sig=" + sig + "&se=" + se
}

func TestExpiredCertificateRefused(t *testing.T) {
	later := time.Now().Add(2 * pki.LeafValidity)
	f := newFixture(t, hubtest.WithClock(func() time.Time { return later }))
	cert := f.device(t, "dev")
	_, err := f.connect(t, clientConfig{id: "dev", cert: &cert})
	assert.ErrorIs(t, err, packets.ErrorRefusedNotAuthorised)
}

func TestClientDetailsRecorded(t *testing.T) {
	f := newFixture(t)
	cert := f.device(t, "dev")
	f.mustConnect(t, clientConfig{id: "dev", cert: &cert,
		username: f.srv.Name() + "/dev/?api-version=2021-04-12&model-id=dtmi%3Acom%3Aexample%3Agw%3B1&DeviceClientType=azure-iot-device%2F1.18.4%20(node)"})
	info, err := f.srv.Device("dev")
	require.NoError(t, err)
	assert.Equal(t, "dtmi:com:example:gw;1", info.ModelID)
	assert.Equal(t, "azure-iot-device/1.18.4 (node)", info.ClientType)
	assert.Equal(t, "2021-04-12", info.APIVersion)
	assert.True(t, info.Connected)
	assert.Equal(t, []string{"x509-ca"}, info.Auth)

	bundle, err := certcodec.ParseCertificates(f.srv.TrustBundle())
	require.NoError(t, err)
	require.Len(t, bundle, 1)
	assert.True(t, bundle[0].Equal(f.srv.CA.Root()))
}

func TestNewConnectionKicksOld(t *testing.T) {
	f := newFixture(t)
	cert := f.device(t, "dev")
	first := f.mustConnect(t, clientConfig{id: "dev", cert: &cert, clean: true})
	f.mustConnect(t, clientConfig{id: "dev", cert: &cert, clean: true})
	first.waitLost(t)
	assert.Equal(t, 1, f.srv.Stats().Kicked)
	assert.True(t, f.srv.Connected("dev"), "the newer connection stays")
}

func TestProtocolMisuseClosesConnection(t *testing.T) {
	f := newFixture(t)
	cert := f.device(t, "dev")
	big := make([]byte, hubtest.MaxTelemetrySize+1)
	for _, tc := range []struct {
		name    string
		topic   string
		qos     byte
		payload []byte
	}{
		{"QoS 2", "devices/dev/messages/events/", 2, []byte("x")},
		{"another device's topic", "devices/other/messages/events/", 1, []byte("x")},
		{"unknown topic", "some/topic", 1, []byte("x")},
		{"oversized telemetry", "devices/dev/messages/events/", 1, big},
		{"twin GET without rid", "$iothub/twin/GET/", 0, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := f.srv.Stats().Violations
			c := f.mustConnect(t, clientConfig{id: "dev", cert: &cert, clean: true})
			c.Publish(tc.topic, tc.qos, false, tc.payload)
			c.waitLost(t)
			assert.Equal(t, before+1, f.srv.Stats().Violations)
			assert.Empty(t, f.srv.Telemetry("dev"))
		})
	}
}

func TestTelemetry(t *testing.T) {
	f := newFixture(t)
	cert := f.device(t, "dev")
	c := f.mustConnect(t, clientConfig{id: "dev", cert: &cert})
	c.publish(t, "devices/dev/messages/events/", 1, []byte(`{"n":1}`))
	// The C# SDK's form: percent-encoded system properties and a trailing slash.
	c.publish(t, "devices/dev/messages/events/%24.ct=application%2Fjson&%24.ce=utf-8&%24.mid=m-2&alert=a%20b%2Bc&flag/", 0, []byte(`{"n":2}`))
	tok := c.Publish("devices/dev/messages/events/k=v", 1, true, []byte(`{"n":3}`))
	require.True(t, tok.WaitTimeout(10*time.Second))

	got, err := f.srv.WaitTelemetry(testContext(t), "dev", 3)
	require.NoError(t, err)
	require.Len(t, got, 3)
	assert.Equal(t, `{"n":1}`, string(got[0].Payload))
	assert.Empty(t, got[0].Properties)
	assert.Equal(t, byte(1), got[0].QoS)

	assert.Equal(t, map[string]string{"$.ct": "application/json", "$.ce": "utf-8", "$.mid": "m-2"}, got[1].System)
	assert.Equal(t, map[string]string{"alert": "a b+c", "flag": ""}, got[1].Properties)
	assert.Equal(t, byte(0), got[1].QoS)

	assert.Equal(t, map[string]string{"k": "v", "mqtt-retain": "true"}, got[2].Properties)
	assert.Equal(t, "dev", got[2].DeviceID)
	assert.Len(t, f.srv.Telemetry(""), 3)
	assert.Empty(t, f.srv.Telemetry("other"))
}

func TestCloudToDevice(t *testing.T) {
	f := newFixture(t)
	cert := f.device(t, "dev")

	// Queued while the device is offline, delivered once it subscribes.
	id, err := f.srv.SendC2D("dev", []byte("hello"), map[string]string{"$.cid": "corr 1", "app": "a/b?c=d"})
	require.NoError(t, err)
	c := f.mustConnect(t, clientConfig{id: "dev", cert: &cert})
	c.subscribe(t, "devices/dev/messages/devicebound/#", 1)
	m := c.next(t)
	assert.Equal(t, "hello", string(m.Payload()))
	assert.Equal(t, byte(1), m.Qos())
	assert.Regexp(t, guidRE, id, "a GUID, as Azure's")
	assert.Equal(t, "devices/dev/messages/devicebound/%24.cid=corr%201&%24.mid="+id+
		"&%24.to=%2Fdevices%2Fdev%2Fmessages%2FdeviceBound&app=a%2Fb%3Fc%3Dd", m.Topic())

	// The PUBACK completes it.
	require.NoError(t, f.srv.Await(testContext(t), func() bool {
		p, _ := f.srv.PendingC2D("dev")
		return len(p) == 0
	}))

	// Delivered at once to a connected, subscribed device; a message ID the sender chose is
	// kept.
	id, err = f.srv.SendC2D("dev", []byte("second"), map[string]string{"$.mid": "order-17"})
	require.NoError(t, err)
	assert.Equal(t, "order-17", id)
	m = c.next(t)
	assert.Equal(t, "second", string(m.Payload()))
	assert.Equal(t, "devices/dev/messages/devicebound/%24.mid=order-17&%24.to=%2Fdevices%2Fdev%2Fmessages%2FdeviceBound", m.Topic())

	_, err = f.srv.SendC2D("nobody", nil, nil)
	assert.ErrorIs(t, err, hubtest.ErrDeviceNotFound)
}

func TestCloudToDeviceQueueLimit(t *testing.T) {
	f := newFixture(t)
	f.device(t, "dev")
	for i := range hubtest.MaxC2DPending {
		_, err := f.srv.SendC2D("dev", []byte{byte(i)}, nil)
		require.NoError(t, err)
	}
	_, err := f.srv.SendC2D("dev", []byte("one too many"), nil)
	assert.ErrorIs(t, err, hubtest.ErrQueueFull)
	_, err = f.srv.SendC2D("dev", make([]byte, hubtest.MaxC2DSize+1), nil)
	assert.Error(t, err)
}

// TestPersistentSession checks CleanSession 0: the subscriptions and an unacknowledged
// message survive a reconnect without a new SUBSCRIBE; CleanSession 1 drops the
// subscriptions but not the queue.
func TestPersistentSession(t *testing.T) {
	f := newFixture(t)
	cert := f.device(t, "dev")
	c := f.mustConnect(t, clientConfig{id: "dev", cert: &cert, noAutoAck: true})
	assert.False(t, c.sessionPresent, "no earlier session")
	c.subscribe(t, "devices/dev/messages/devicebound/#", 1)
	c.subscribe(t, "$iothub/twin/PATCH/properties/desired/#", 0)
	_, err := f.srv.SendC2D("dev", []byte("unacked"), nil)
	require.NoError(t, err)
	assert.Equal(t, "unacked", string(c.next(t).Payload()), "received but not acknowledged")
	c.Disconnect(0)
	require.NoError(t, f.srv.Await(testContext(t), func() bool { return !f.srv.Connected("dev") }))

	c = f.mustConnect(t, clientConfig{id: "dev", cert: &cert})
	assert.True(t, c.sessionPresent)
	m := c.next(t)
	assert.Equal(t, "unacked", string(m.Payload()), "redelivered on the resumed session")
	require.NoError(t, f.srv.Await(testContext(t), func() bool {
		p, _ := f.srv.PendingC2D("dev")
		return len(p) == 0
	}))
	v, err := f.srv.PatchDesired("dev", []byte(`{"rate":5}`))
	require.NoError(t, err)
	m = c.next(t)
	assert.Equal(t, "$iothub/twin/PATCH/properties/desired/?$version=2", m.Topic())
	assert.Equal(t, 2, v)
	c.Disconnect(0)

	// A clean session has no subscriptions: nothing arrives until it subscribes again.
	c = f.mustConnect(t, clientConfig{id: "dev", cert: &cert, clean: true})
	assert.False(t, c.sessionPresent)
	_, err = f.srv.SendC2D("dev", []byte("after clean"), nil)
	require.NoError(t, err)
	_, err = f.srv.PatchDesired("dev", []byte(`{"rate":6}`))
	require.NoError(t, err)
	c.subscribe(t, "devices/dev/messages/devicebound/#", 1)
	assert.Equal(t, "after clean", string(c.next(t).Payload()), "the queue survives a clean session")
	select {
	case m := <-c.msgs:
		t.Fatalf("unexpected message on %s", m.Topic())
	default:
	}
}

func TestTwin(t *testing.T) {
	f := newFixture(t)
	cert := f.device(t, "dev")
	require.NoError(t, f.srv.Register(hubtest.Device{ID: "with-initial", CAs: []*x509.Certificate{f.factory.Certificate},
		InitialTwin: json.RawMessage(`{"mode":"eco"}`)}))
	c := f.mustConnect(t, clientConfig{id: "dev", cert: &cert})

	// Without a subscription to the response topic, nothing comes back.
	c.publish(t, "$iothub/twin/GET/?$rid=early", 0, nil)
	c.subscribe(t, "$iothub/twin/res/#", 0)
	c.subscribe(t, "$iothub/twin/PATCH/properties/desired/#", 0)

	c.publish(t, "$iothub/twin/GET/?$rid=g1", 0, nil)
	m := c.next(t)
	assert.Equal(t, "$iothub/twin/res/200/?$rid=g1", m.Topic())
	assert.JSONEq(t, `{"desired":{"$version":1},"reported":{"$version":1}}`, string(m.Payload()))

	for _, tc := range []struct {
		name, patch, topic string
	}{
		{"set", `{"fw":"1.2","net":{"ip":"10.0.0.2","up":true},"big":12345678901234567890}`, "$iothub/twin/res/204/?$rid=p1&$version=2"},
		{"null deletes", `{"net":{"ip":null},"fw":null}`, "$iothub/twin/res/204/?$rid=p1&$version=3"},
		{"malformed JSON", `{"fw":`, "$iothub/twin/res/400/?$rid=p1"},
		{"not an object", `[1,2]`, "$iothub/twin/res/400/?$rid=p1"},
		{"dollar in a name", `{"$x":1}`, "$iothub/twin/res/400/?$rid=p1"},
		{"dot in a name", `{"a":{"b.c":1}}`, "$iothub/twin/res/400/?$rid=p1"},
		{"too deep", strings.Repeat(`{"a":`, 11) + "1" + strings.Repeat("}", 11), "$iothub/twin/res/400/?$rid=p1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c.publish(t, "$iothub/twin/PATCH/properties/reported/?$rid=p1", 1, []byte(tc.patch))
			m := c.next(t)
			assert.Equal(t, tc.topic, m.Topic())
		})
	}
	tw, err := f.srv.WaitReported(testContext(t), "dev", 3)
	require.NoError(t, err)
	assert.Equal(t, 3, tw.ReportedVersion)
	got, err := json.Marshal(tw)
	require.NoError(t, err)
	assert.JSONEq(t, `{"desired":{"$version":1},"reported":{"$version":3,"net":{"up":true},"big":12345678901234567890}}`, string(got))

	// Desired patches reach the subscribed device with the new version.
	v, err := f.srv.PatchDesired("dev", []byte(`{"interval":30,"nested":{"a":1}}`))
	require.NoError(t, err)
	assert.Equal(t, 2, v)
	m = c.next(t)
	assert.Equal(t, "$iothub/twin/PATCH/properties/desired/?$version=2", m.Topic())
	assert.JSONEq(t, `{"interval":30,"nested":{"a":1},"$version":2}`, string(m.Payload()))
	_, err = f.srv.PatchDesired("dev", []byte(`{"nested":{"a":null}}`))
	require.NoError(t, err)
	c.next(t)
	c.publish(t, "$iothub/twin/GET/?$rid=g2", 0, nil)
	m = c.next(t)
	assert.JSONEq(t, `{"desired":{"$version":3,"interval":30,"nested":{}},"reported":{"$version":3,"net":{"up":true},"big":12345678901234567890}}`, string(m.Payload()))

	_, err = f.srv.PatchDesired("dev", []byte(`not json`))
	assert.ErrorIs(t, err, hubtest.ErrBadTwinPatch)
	_, err = f.srv.PatchDesired("nobody", []byte(`{}`))
	assert.ErrorIs(t, err, hubtest.ErrDeviceNotFound)

	// A twin handed out is a copy: changing it changes nothing in the hub.
	_, err = f.srv.PatchDesired("dev", []byte(`{"list":[{"a":1}]}`))
	require.NoError(t, err)
	c.next(t)
	tw, err = f.srv.Twin("dev")
	require.NoError(t, err)
	tw.Desired["list"].([]any)[0].(map[string]any)["a"] = "changed"
	tw, err = f.srv.Twin("dev")
	require.NoError(t, err)
	assert.Equal(t, json.Number("1"), tw.Desired["list"].([]any)[0].(map[string]any)["a"])

	initial, err := f.srv.Twin("with-initial")
	require.NoError(t, err)
	assert.Equal(t, map[string]any{"mode": "eco"}, initial.Desired)
	assert.Equal(t, 1, initial.DesiredVersion)
}

func TestDirectMethods(t *testing.T) {
	f := newFixture(t)
	cert := f.device(t, "dev")
	f.device(t, "offline")
	c := f.mustConnect(t, clientConfig{id: "dev", cert: &cert})

	_, err := f.srv.Invoke(testContext(t), "dev", "reboot", nil)
	assert.ErrorIs(t, err, hubtest.ErrDeviceNotOnline, "not subscribed to methods")

	c.subscribe(t, "$iothub/methods/POST/#", 0)
	rids := make(chan string, 1)
	go func() {
		m := <-c.msgs
		rid := m.Topic()[strings.Index(m.Topic(), "$rid=")+5:]
		rids <- rid
		// A stray answer for another request is ignored.
		c.Publish("$iothub/methods/res/500/?$rid=unknown", 0, false, []byte(`{}`))
		c.Publish("$iothub/methods/res/201/?$rid="+rid, 0, false, []byte(`{"echo":`+string(m.Payload())+`,"topic":"`+strings.Split(m.Topic(), "?")[0]+`"}`))
	}()
	res, err := f.srv.Invoke(testContext(t), "dev", "reboot", []byte(`{"delay":5}`))
	require.NoError(t, err)
	assert.Equal(t, 201, res.Status)
	assert.JSONEq(t, `{"echo":{"delay":5},"topic":"$iothub/methods/POST/reboot/"}`, string(res.Payload))
	assert.Regexp(t, guidRE, <-rids, "the request ID is a GUID, as Azure's")

	// No answer: the caller's deadline gives ErrTimeout.
	ctx, cancel := context.WithTimeout(testContext(t), 200*time.Millisecond)
	defer cancel()
	_, err = f.srv.Invoke(ctx, "dev", "ignored", nil)
	assert.ErrorIs(t, err, hubtest.ErrTimeout)
	<-c.msgs

	_, err = f.srv.Invoke(testContext(t), "offline", "reboot", nil)
	assert.ErrorIs(t, err, hubtest.ErrDeviceNotOnline)
	_, err = f.srv.Invoke(testContext(t), "nobody", "reboot", nil)
	assert.ErrorIs(t, err, hubtest.ErrDeviceNotFound)
	_, err = f.srv.Invoke(testContext(t), "dev", "reboot", []byte("not json"))
	assert.Error(t, err)

	// Disconnecting while a call waits ends it at once.
	go func() {
		<-c.msgs
		c.Disconnect(0)
	}()
	_, err = f.srv.Invoke(testContext(t), "dev", "bye", nil)
	assert.ErrorIs(t, err, hubtest.ErrDeviceNotOnline)
}

func TestControls(t *testing.T) {
	f := newFixture(t)
	cert := f.device(t, "dev")

	t.Run("disable closes and refuses", func(t *testing.T) {
		c := f.mustConnect(t, clientConfig{id: "dev", cert: &cert})
		require.NoError(t, f.srv.SetDisabled("dev", true))
		c.waitLost(t)
		_, err := f.connect(t, clientConfig{id: "dev", cert: &cert})
		assert.ErrorIs(t, err, packets.ErrorRefusedNotAuthorised)
		info, err := f.srv.Device("dev")
		require.NoError(t, err)
		assert.Equal(t, "disabled", info.Status)
		require.NoError(t, f.srv.SetDisabled("dev", false))
		f.mustConnect(t, clientConfig{id: "dev", cert: &cert}).Disconnect(0)
	})

	t.Run("move refuses on the old hub and keeps the twin", func(t *testing.T) {
		other := hubtest.NewServer(t, hubtest.WithCA(f.srv.CA))
		c := f.mustConnect(t, clientConfig{id: "dev", cert: &cert})
		_, err := f.srv.PatchDesired("dev", []byte(`{"k":"v"}`))
		require.NoError(t, err)
		_, err = f.srv.SendC2D("dev", []byte("follow me"), nil)
		require.NoError(t, err)

		require.NoError(t, f.srv.Move("dev", other.Hub))
		c.waitLost(t)
		_, err = f.connect(t, clientConfig{id: "dev", cert: &cert})
		assert.ErrorIs(t, err, packets.ErrorRefusedNotAuthorised)
		assert.Empty(t, f.srv.Devices())

		moved := &fixture{srv: other, factory: f.factory}
		c = moved.mustConnect(t, clientConfig{id: "dev", cert: &cert})
		c.subscribe(t, "devices/dev/messages/devicebound/#", 1)
		assert.Equal(t, "follow me", string(c.next(t).Payload()))
		tw, err := other.Twin("dev")
		require.NoError(t, err)
		assert.Equal(t, "v", tw.Desired["k"])
		assert.ErrorIs(t, other.Move("nobody", f.srv.Hub), hubtest.ErrDeviceNotFound)
		require.NoError(t, other.Move("dev", f.srv.Hub))
	})

	t.Run("delete closes and refuses", func(t *testing.T) {
		c := f.mustConnect(t, clientConfig{id: "dev", cert: &cert})
		require.NoError(t, f.srv.Delete("dev"))
		c.waitLost(t)
		_, err := f.connect(t, clientConfig{id: "dev", cert: &cert})
		assert.ErrorIs(t, err, packets.ErrorRefusedNotAuthorised)
		assert.ErrorIs(t, f.srv.Delete("dev"), hubtest.ErrDeviceNotFound)
		assert.ErrorIs(t, f.srv.SetDisabled("dev", true), hubtest.ErrDeviceNotFound)
	})
}

func TestWebSocket(t *testing.T) {
	f := newFixture(t)
	cert := f.device(t, "dev")
	for _, path := range []string{"/$iothub/websocket", "/"} {
		t.Run(path, func(t *testing.T) {
			c := f.mustConnect(t, clientConfig{id: "dev", cert: &cert, clean: true, broker: "wss://" + f.srv.WebSocketAddr + path})
			c.publish(t, "devices/dev/messages/events/", 1, []byte(path))
			got, err := f.srv.WaitTelemetry(testContext(t), "dev", 1)
			require.NoError(t, err)
			assert.Equal(t, path, string(got[len(got)-1].Payload))
			c.Disconnect(0)
			require.NoError(t, f.srv.Await(testContext(t), func() bool { return !f.srv.Connected("dev") }))
		})
	}
}

func TestRegisterUpdatesCredentials(t *testing.T) {
	f := newFixture(t)
	cert := f.device(t, "dev")
	c := f.mustConnect(t, clientConfig{id: "dev", cert: &cert})
	c.subscribe(t, "$iothub/twin/res/#", 0)
	c.publish(t, "$iothub/twin/PATCH/properties/reported/?$rid=1", 0, []byte(`{"a":1}`))
	c.next(t)

	// Re-registering with other credentials keeps the twin; disabling through Register kicks.
	key := []byte("k")
	require.NoError(t, f.srv.Register(hubtest.Device{ID: "dev", SymmetricKeys: [][]byte{key}, Disabled: true}))
	c.waitLost(t)
	require.NoError(t, f.srv.Register(hubtest.Device{ID: "dev", SymmetricKeys: [][]byte{key}}))
	_, err := f.connect(t, clientConfig{id: "dev", cert: &cert})
	assert.ErrorIs(t, err, packets.ErrorRefusedNotAuthorised, "the certificate is no longer a credential")
	f.mustConnect(t, clientConfig{id: "dev", password: sas.Token(key, f.srv.Name()+"/devices/dev", time.Now().Add(time.Hour), "")})
	tw, err := f.srv.Twin("dev")
	require.NoError(t, err)
	assert.Equal(t, 2, tw.ReportedVersion)
	assert.Error(t, f.srv.Register(hubtest.Device{}))
	assert.Error(t, f.srv.Register(hubtest.Device{ID: "x", InitialTwin: json.RawMessage(`[]`)}))
}

// TestNamedHub checks a hub advertised under a LAN name: that name is the hub's name, is
// accepted in usernames and is in the server certificate.
func TestNamedHub(t *testing.T) {
	ca, err := pki.NewRoot("root")
	require.NoError(t, err)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	h, err := hubtest.NewNamed("emulator.lan", l, nil, hubtest.WithCA(ca))
	require.NoError(t, err)
	t.Cleanup(func() { h.Close() })
	_, port, _ := net.SplitHostPort(l.Addr().String())
	assert.Equal(t, "emulator.lan:"+port, h.Name())

	factory, err := ca.NewIntermediate("factory")
	require.NoError(t, err)
	leaf, err := factory.NewDevice("dev")
	require.NoError(t, err)
	require.NoError(t, h.Register(hubtest.Device{ID: "dev", CAs: []*x509.Certificate{factory.Certificate}}))

	f := &fixture{srv: &hubtest.Server{Hub: h, Addr: l.Addr().String(), CA: ca}, factory: factory}
	cert := leaf.TLSCertificate()
	c, err := f.connect(t, clientConfig{id: "dev", cert: &cert, tlsServerName: "emulator.lan"})
	require.NoError(t, err)
	c.Disconnect(0)
}

func TestFaults(t *testing.T) {
	f := newFixture(t)
	cert := f.device(t, "dev")

	t.Run("failed connects", func(t *testing.T) {
		f.srv.FailConnects(2, packets.ErrRefusedServerUnavailable)
		for range 2 {
			_, err := f.connect(t, clientConfig{id: "dev", cert: &cert})
			assert.ErrorIs(t, err, packets.ErrorRefusedServerUnavailable)
		}
		f.mustConnect(t, clientConfig{id: "dev", cert: &cert}).Disconnect(0)
	})

	t.Run("twin throttled", func(t *testing.T) {
		c := f.mustConnect(t, clientConfig{id: "dev", cert: &cert, clean: true})
		c.subscribe(t, "$iothub/twin/res/#", 0)
		f.srv.FailTwin(2, 429)
		c.publish(t, "$iothub/twin/GET/?$rid=a", 0, nil)
		m := c.next(t)
		assert.Equal(t, "$iothub/twin/res/429/?$rid=a", m.Topic())
		assert.Contains(t, string(m.Payload()), "429000")
		c.publish(t, "$iothub/twin/PATCH/properties/reported/?$rid=b", 0, []byte(`{"x":1}`))
		assert.Equal(t, "$iothub/twin/res/429/?$rid=b", c.next(t).Topic())
		tw, err := f.srv.Twin("dev")
		require.NoError(t, err)
		assert.Empty(t, tw.Reported, "a failed patch changes nothing")
		c.publish(t, "$iothub/twin/PATCH/properties/reported/?$rid=c", 0, []byte(`{"x":1}`))
		assert.Equal(t, "$iothub/twin/res/204/?$rid=c&$version=2", c.next(t).Topic())
		c.Disconnect(0)
	})

	t.Run("disconnect", func(t *testing.T) {
		c := f.mustConnect(t, clientConfig{id: "dev", cert: &cert})
		require.NoError(t, f.srv.Disconnect("dev"))
		c.waitLost(t)
		f.mustConnect(t, clientConfig{id: "dev", cert: &cert}).Disconnect(0)
		require.NoError(t, f.srv.Await(testContext(t), func() bool { return !f.srv.Connected("dev") }))
		assert.ErrorIs(t, f.srv.Disconnect("dev"), hubtest.ErrDeviceNotOnline)
		assert.ErrorIs(t, f.srv.Disconnect("nobody"), hubtest.ErrDeviceNotFound)
	})
}

// TestHostNameAlias checks WithHostNames: the extra name is in the certificate and accepted
// in usernames and SAS resources, while the hub keeps its localhost name.
func TestHostNameAlias(t *testing.T) {
	f := newFixture(t, hubtest.WithHostNames("myhub.azure-devices.net"))
	assert.True(t, strings.HasPrefix(f.srv.Name(), "localhost:"))
	key := []byte("k")
	require.NoError(t, f.srv.Register(hubtest.Device{ID: "dev", SymmetricKeys: [][]byte{key}}))
	c, err := f.connect(t, clientConfig{id: "dev", tlsServerName: "myhub.azure-devices.net",
		username: "myhub.azure-devices.net/dev/?api-version=2021-04-12",
		password: sas.Token(key, "myhub.azure-devices.net/devices/dev", time.Now().Add(time.Hour), "")})
	require.NoError(t, err)
	c.Disconnect(0)
}
