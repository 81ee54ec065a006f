package dpstest_test

import (
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/dps/dpstest"
)

// TestSDKVariants drives one registration per request shape that some Azure SDK sends
// (protocol.md §1.2, §2.2–2.5); every one must end assigned.
func TestSDKVariants(t *testing.T) {
	s := dpstest.NewServer(t, fast)
	scope := s.IDScope()
	for i, tc := range []struct {
		name         string
		username     string // %s is the registration ID
		registerBody string
		pollBody     string
		registerQoS  byte
		pollQoS      byte
		subQoS       byte
		rid          string
		escapePollID bool
	}{
		{name: "esdk-c", username: scope + "/registrations/%s/api-version=2019-03-31",
			registerBody: `{"registrationId":"%s"}`, registerQoS: 1, pollQoS: 0, subQoS: 1, rid: "1"},
		{name: "esdk-c user agent raw", username: scope + "/registrations/%s/api-version=2019-03-31&ClientVersion=c/1.2.3",
			registerBody: `{"registrationId":"%s","payload":{"testData":1, "testData2":{"a":"b"}}}`, registerQoS: 1, subQoS: 1, rid: "1"},
		{name: "csdk", username: scope + "/registrations/%s/api-version=2021-06-01&ClientVersion=1.15.0",
			registerBody: `{"registrationId":"%s"}`, pollBody: `{"registrationId":"%s"}`, registerQoS: 0, pollQoS: 0, subQoS: 1, rid: "17"},
		{name: "node", username: scope + "/registrations/%s/api-version=2019-03-31&ClientVersion=" + url.QueryEscape("azure-iot-provisioning-device/1.9.1"),
			registerBody: `{"registrationId":"%s","payload":{"modelId":"dtmi:com:example;1"}}`, pollBody: " ", registerQoS: 1, pollQoS: 1, subQoS: 1,
			rid: "a8f5f167-f44f-4964-a6c4-3ef5b7b6c8c4"},
		{name: "python", username: scope + "/registrations/%s/api-version=2019-03-31&ClientVersion=azure-iot-device-provisioning-py%2F2.14.0%28cpython%3BLinux%206.1%3Bx86_64%29",
			registerBody: `{"payload": null, "registrationId": "%s"}`, pollBody: " ", registerQoS: 1, pollQoS: 1, subQoS: 1,
			rid: "7f1e9a52-2d5b-4f0c-9a5e-8b2b2c9d7e11", escapePollID: true},
		{name: "csharp empty body", username: scope + "/registrations/%s/api-version=2019-03-31&ClientVersion=Microsoft.Azure.Devices.Provisioning.Client%2F1.19.0",
			registerBody: "", registerQoS: 1, pollQoS: 1, subQoS: 1, rid: "2"},
		{name: "csharp payload only", username: scope + "/registrations/%s/api-version=2019-03-31",
			registerBody: `{"payload":{"a":1}}`, registerQoS: 1, pollQoS: 1, subQoS: 2, rid: "3"},
		{name: "api 2021-10-01 qos 0 subscription", username: scope + "/registrations/%s/api-version=2021-10-01",
			registerBody: "  \n{\"registrationId\" : \"%s\" }\n", registerQoS: 1, pollQoS: 1, subQoS: 0, rid: "x y"},
		{name: "preview api without csr", username: scope + "/registrations/%s/api-version=2025-07-01-preview",
			registerBody: `{"registrationId":"%s","unknownField":[1,2]}`, registerQoS: 1, pollQoS: 1, subQoS: 1, rid: ""},
		{name: "lower-case scope", username: strings.ToLower(scope) + "/registrations/%s/api-version=2019-03-31",
			registerBody: `{"registrationId":"%s"}`, registerQoS: 1, pollQoS: 1, subQoS: 1, rid: "1"},
	} {
		regID := "variant-" + strconv.Itoa(i)
		t.Run(tc.name, func(t *testing.T) {
			d := mustDial(t, s, dialOpts{regID: regID, username: strings.ReplaceAll(tc.username, "%s", regID),
				cert: factoryCert(t, s, regID), noSub: true})
			wantQoS := min(tc.subQoS, 1)
			assert.Equal(t, wantQoS, d.subscribe("$dps/registrations/res/#", tc.subQoS), "granted QoS")

			d.publish("$dps/registrations/PUT/iotdps-register/?$rid="+tc.rid, tc.registerQoS, strings.ReplaceAll(tc.registerBody, "%s", regID))
			r := d.next()
			require.Equal(t, 202, r.status, "%s", r.raw)
			assert.Equal(t, tc.rid, r.rid, "rid echoed verbatim")
			assert.Equal(t, wantQoS, r.qos)
			assert.Equal(t, 0, r.retryAfter)

			opID := r.body.OperationID
			if tc.escapePollID {
				opID = url.QueryEscape(opID)
			}
			d.publish("$dps/registrations/GET/iotdps-get-operationstatus/?$rid="+tc.rid+"&operationId="+opID, tc.pollQoS, strings.ReplaceAll(tc.pollBody, "%s", regID))
			r = d.next()
			require.Equal(t, 200, r.status, "%s", r.raw)
			assert.Equal(t, tc.rid, r.rid)
			assert.Equal(t, "assigned", r.body.Status)
			assert.Equal(t, regID, r.body.RegistrationState.DeviceID)
		})
	}
}

// TestRequestErrors covers requests the service refuses with a request-level error.
func TestRequestErrors(t *testing.T) {
	s := dpstest.NewServer(t, fast)
	for _, tc := range []struct {
		name, regID, body string
		status, code      int
		message           string
	}{
		{"body not JSON", "bad-json", `{"registrationId":`, 400, 400004, "Invalid request body"},
		{"body names another device", "me", `{"registrationId":"someone-else"}`, 400, 400005, `"someone-else"`},
		{"registration ID with bad characters", "bad*id", `{}`, 400, 400006, "not valid"},
		{"registration ID ending in a dot", "ends.", ``, 400, 400006, "not valid"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := mustDial(t, s, dialOpts{regID: tc.regID, cert: factoryCert(t, s, tc.regID)})
			d.publish(registerTopic+"9", 1, tc.body)
			r := d.next()
			assert.Equal(t, tc.status, r.status)
			assert.Equal(t, tc.code, r.body.ErrorCode)
			assert.Contains(t, r.body.Message, tc.message)
			assert.NotEmpty(t, r.body.TrackingID)
			assert.Equal(t, -1, r.retryAfter)
		})
	}

	t.Run("unknown operation", func(t *testing.T) {
		d := mustDial(t, s, dialOpts{regID: "poller", cert: factoryCert(t, s, "poller")})
		r := d.poll("4.0000000000000000.00000000-0000-4000-8000-000000000000")
		assert.Equal(t, 404, r.status)
		assert.Equal(t, 404201, r.body.ErrorCode)
	})
	t.Run("another device's operation", func(t *testing.T) {
		a := mustDial(t, s, dialOpts{regID: "owner", cert: factoryCert(t, s, "owner")})
		op := a.register("owner").body.OperationID
		b := mustDial(t, s, dialOpts{regID: "thief", cert: factoryCert(t, s, "thief")})
		r := b.poll(op)
		assert.Equal(t, 404, r.status)
		a.quiet(100 * time.Millisecond)
	})
	t.Run("a new registration supersedes the last operation", func(t *testing.T) {
		d := mustDial(t, s, dialOpts{regID: "twice", cert: factoryCert(t, s, "twice")})
		first := d.register("twice").body.OperationID
		second := d.register("twice").body.OperationID
		assert.NotEqual(t, first, second)
		assert.Equal(t, 404, d.poll(first).status)
		assert.Equal(t, 200, d.poll(second).status)
	})
	t.Run("poll after reconnect with the cached operation ID", func(t *testing.T) {
		d := mustDial(t, s, dialOpts{regID: "rejoin", cert: factoryCert(t, s, "rejoin")})
		op := d.register("rejoin").body.OperationID
		d.client.Disconnect(0)
		d = mustDial(t, s, dialOpts{regID: "rejoin", cert: factoryCert(t, s, "rejoin")})
		assert.Equal(t, 200, d.poll(op).status)
	})
}

// TestNotABroker checks that replies go only to the asker and that nothing else is served.
func TestNotABroker(t *testing.T) {
	s := dpstest.NewServer(t, fast)
	a := mustDial(t, s, dialOpts{regID: "a", cert: factoryCert(t, s, "a")})
	b := mustDial(t, s, dialOpts{regID: "b", cert: factoryCert(t, s, "b")})
	assert.Equal(t, 202, a.register("a").status)
	b.quiet(200 * time.Millisecond)

	t.Run("other filters refused", func(t *testing.T) {
		assert.Equal(t, byte(0x80), b.subscribe("#", 1))
		assert.Equal(t, byte(0x80), b.subscribe("$dps/registrations/res/202/#", 1))
	})
	t.Run("unsubscribed device hears nothing", func(t *testing.T) {
		d := mustDial(t, s, dialOpts{regID: "deaf", cert: factoryCert(t, s, "deaf"), noSub: true})
		d.publish(registerTopic+"1", 1, "")
		d.quiet(200 * time.Millisecond)
		d.subscribe(resFilter, 1)
		assert.Equal(t, 202, d.register("deaf").status, "the connection stays usable")
	})
	for _, tc := range []struct {
		name, topic string
		qos         byte
	}{
		{"unknown topic closes the connection", "devices/a/messages/events/", 1},
		{"QoS 2 closes the connection", registerTopic + "1", 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := mustDial(t, s, dialOpts{regID: "misuse", cert: factoryCert(t, s, "misuse")})
			d.client.Publish(tc.topic, tc.qos, false, "{}")
			assert.Error(t, d.closed())
		})
	}
}
