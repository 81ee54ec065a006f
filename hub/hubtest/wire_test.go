package hubtest

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/sas"
)

// The usernames SDKs send (protocol.md §5.2, §5.9).
func TestParseUsername(t *testing.T) {
	for _, tc := range []struct {
		name, in       string
		host, dev, mod string
		query          map[string]string
		bad            bool
	}{
		{name: "Embedded C", in: "myiothub.azure-devices.net/my_device/?api-version=2020-09-30&DeviceClientType=azsdk-c%2F1.5.0",
			host: "myiothub.azure-devices.net", dev: "my_device",
			query: map[string]string{"api-version": "2020-09-30", "DeviceClientType": "azsdk-c/1.5.0"}},
		{name: "model id", in: "h/my_device/?api-version=2020-09-30&model-id=dtmi%3AYOUR_COMPANY_NAME_HERE%3Asample_device%3B1",
			host: "h", dev: "my_device", query: map[string]string{"api-version": "2020-09-30", "model-id": "dtmi:YOUR_COMPANY_NAME_HERE:sample_device;1"}},
		{name: "module", in: "myiothub.azure-devices.net/my_device/my_module_id/?api-version=2020-09-30&DeviceClientType=azrtos",
			host: "myiothub.azure-devices.net", dev: "my_device", mod: "my_module_id",
			query: map[string]string{"api-version": "2020-09-30", "DeviceClientType": "azrtos"}},
		{name: "C SDK user agent", in: "h:8883/d/?api-version=2020-09-30&DeviceClientType=iothubclient%2f1.0%20(native%3b%20Linux%3b%20aarch64)",
			host: "h:8883", dev: "d", query: map[string]string{"api-version": "2020-09-30", "DeviceClientType": "iothubclient/1.0 (native; Linux; aarch64)"}},
		{name: "raw value kept", in: "h/d/?api-version=1&DeviceClientType=100%", host: "h", dev: "d",
			query: map[string]string{"api-version": "1", "DeviceClientType": "100%"}},
		{name: "device ID with ?", in: "h/a?b/?api-version=1", host: "h", dev: "a?b", query: map[string]string{"api-version": "1"}},
		{name: "DPS form", in: "0ne/registrations/r/api-version=2019-03-31", bad: true},
		{name: "no api-version", in: "h/d/?x=1", bad: true},
		{name: "no query", in: "h/d", bad: true},
		{name: "empty host", in: "/d/?api-version=1", bad: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id, err := parseUsername(tc.in)
			if tc.bad {
				assert.ErrorIs(t, err, errBadUsername)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, identity{host: tc.host, deviceID: tc.dev, moduleID: tc.mod, query: tc.query}, id)
		})
	}
}

func TestProperties(t *testing.T) {
	app, sys := parseProperties("%24.to=%2Fdevices%2Fuseragent_c%2Fmessages%2FdeviceBound&abc=123&ghi=%2Fsome%2Fthing&jkl=%2Fsome%2Fthing%2F%3Fbla%3Dbla")
	assert.Equal(t, map[string]string{"$.to": "/devices/useragent_c/messages/deviceBound"}, sys)
	assert.Equal(t, map[string]string{"abc": "123", "ghi": "/some/thing", "jkl": "/some/thing/?bla=bla"}, app)

	app, sys = parseProperties("/%24.cid=c&%24.mid=1&a=%2F%3F%26%3D&b=x%20y/")
	assert.Equal(t, map[string]string{"a": "/?&=", "b": "x y"}, app, "leading and trailing slashes (C# SDK) are not part of the bag")
	assert.Equal(t, map[string]string{"$.mid": "1", "$.cid": "c"}, sys)
}

func TestCheckSAS(t *testing.T) {
	key := []byte("secret")
	now := time.Unix(1578941000, 0)
	res := []string{"myiothub.azure-devices.net/devices/my_device"}
	good := sas.Token(key, "myiothub.azure-devices.net/devices/my_device", time.Unix(1578941692, 0), "")
	assert.Contains(t, good, "sr=myiothub.azure-devices.net%2Fdevices%2Fmy_device&sig=")
	assert.NoError(t, checkSAS(good, res, [][]byte{key}, now))
	assert.NoError(t, checkSAS(good+"&skn=device", res, [][]byte{key}, now), "unknown fields ignored")
	for name, pw := range map[string]string{
		"expired":   good,
		"no prefix": good[len("SharedAccessSignature "):],
		"no sig":    "SharedAccessSignature sr=x&se=1",
		"bad se":    "SharedAccessSignature sr=myiothub.azure-devices.net%2Fdevices%2Fmy_device&sig=AA%3D%3D&se=soon",
		"bad b64":   "SharedAccessSignature sr=myiothub.azure-devices.net%2Fdevices%2Fmy_device&sig=!!&se=1578941692",
	} {
		t.Run(name, func(t *testing.T) {
			at := now
			if name == "expired" {
				at = time.Unix(1578941692, 0)
			}
			assert.ErrorIs(t, checkSAS(pw, res, [][]byte{key}, at), errBadSAS)
		})
	}
}
