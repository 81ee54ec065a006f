package dpstest_test

import (
	"bytes"
	"crypto/tls"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/dps/dpstest"
	"github.com/unicity-iot/unicity/sas"
)

// restClient is a device speaking the REST form of the device API (certificates.md §4), as
// the Node SDK's HTTP transport does: every request authenticates by itself.
type restClient struct {
	t     *testing.T
	s     *dpstest.Server
	addr  string
	http  *http.Client
	regID string
	auth  string
}

func newREST(t *testing.T, s *dpstest.Server, addr, regID string, cert *tls.Certificate) *restClient {
	tlsConf := &tls.Config{RootCAs: s.RootCAs(), ServerName: dpstest.GlobalHost, MinVersion: tls.VersionTLS12}
	if cert != nil {
		tlsConf.Certificates = []tls.Certificate{*cert}
	}
	c := &restClient{t: t, s: s, addr: addr, regID: regID, http: &http.Client{Transport: &http.Transport{TLSClientConfig: tlsConf}}}
	t.Cleanup(c.http.CloseIdleConnections)
	return c
}

type restReply struct {
	status     int
	header     http.Header
	body       map[string]any
	connClosed bool
}

func (c *restClient) do(method, path, body string) restReply {
	c.t.Helper()
	req := mustRequest(c.t, method, "https://"+c.addr+path, strings.NewReader(body))
	req.Header.Set("Accept", "application/json")
	if c.auth != "" {
		req.Header.Set("Authorization", c.auth)
	}
	resp, err := c.http.Do(req)
	require.NoError(c.t, err)
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	require.NoError(c.t, err)
	r := restReply{status: resp.StatusCode, header: resp.Header, connClosed: resp.Close}
	if len(data) > 0 {
		require.NoError(c.t, json.Unmarshal(data, &r.body), "%s", data)
	}
	return r
}

func (c *restClient) register(body string) restReply {
	c.t.Helper()
	return c.do(http.MethodPut, "/"+c.s.IDScope()+"/registrations/"+c.regID+"/register?api-version=2019-03-31", body)
}

func (c *restClient) poll(opID string) restReply {
	c.t.Helper()
	return c.do(http.MethodGet, "/"+c.s.IDScope()+"/registrations/"+c.regID+"/operations/"+opID+"?api-version=2019-03-31", "")
}

func TestREST(t *testing.T) {
	s := dpstest.NewServer(t, func(c *dpstest.Config) { c.RetryAfter = 3 * time.Second })
	for name, addr := range map[string]string{"mqtt port": s.Addr(), "websocket port": s.WebSocketAddr()} {
		t.Run("x509 on the "+name, func(t *testing.T) {
			regID := "rest-x509-" + strings.Fields(name)[0]
			c := newREST(t, s, addr, regID, factoryCert(t, s, regID))
			r := c.register(`{"registrationId":"` + regID + `"}`)
			require.Equal(t, http.StatusAccepted, r.status)
			assert.Equal(t, "3", r.header.Get("Retry-After"))
			assert.Equal(t, "application/json; charset=utf-8", r.header.Get("Content-Type"))
			assert.Equal(t, "assigning", r.body["status"])
			opID := r.body["operationId"].(string)
			assert.Regexp(t, opIDRE, opID)

			r = c.poll(opID)
			require.Equal(t, http.StatusOK, r.status)
			assert.Empty(t, r.header.Get("Retry-After"))
			st := r.body["registrationState"].(map[string]any)
			assert.Equal(t, "assigned", st["status"])
			assert.Equal(t, dpstest.DefaultHub, st["assignedHub"])
			assert.Equal(t, regID, st["deviceId"])
		})
	}
	t.Run("symmetric key", func(t *testing.T) {
		key := []byte("rest-device-key")
		require.NoError(t, s.AddIndividual(dpstest.Individual{RegistrationID: "rest-sas", SymmetricKey: key}))
		c := newREST(t, s, s.Addr(), "rest-sas", nil)
		c.auth = sas.Token(key, s.IDScope()+"/registrations/rest-sas", time.Now().Add(time.Hour), "registration")
		r := c.register(``) // the body is optional, as over MQTT
		require.Equal(t, http.StatusAccepted, r.status)
		r = c.poll(r.body["operationId"].(string))
		require.Equal(t, http.StatusOK, r.status)

		c.auth = sas.Token([]byte("wrong"), s.IDScope()+"/registrations/rest-sas", time.Now().Add(time.Hour), "registration")
		r = c.register(``)
		assert.Equal(t, http.StatusUnauthorized, r.status)
		assert.Equal(t, float64(401000), r.body["errorCode"], "what DPS tells a SAS device")
		assert.Equal(t, "Unauthorized", r.body["message"])
		assert.NotEmpty(t, r.body["trackingId"])
	})
	t.Run("refused", func(t *testing.T) {
		stranger, err := s.IssuingCA().NewDevice("rest-stranger") // chains to no enrollment
		require.NoError(t, err)
		cert := stranger.TLSCertificate()
		r := newREST(t, s, s.Addr(), "rest-stranger", &cert).register(`{}`)
		assert.Equal(t, http.StatusUnauthorized, r.status, "HTTPS always refuses with 401: there is no CONNACK")
		assert.Equal(t, float64(401002), r.body["errorCode"])
		assert.Equal(t, "Invalid certificate.", r.body["message"])

		c := newREST(t, s, s.Addr(), "rest-anonymous", nil)
		assert.Equal(t, http.StatusUnauthorized, c.register(`{}`).status, "neither certificate nor SAS token")

		other := newREST(t, s, s.Addr(), "rest-scope", factoryCert(t, s, "rest-scope"))
		r = other.do(http.MethodPut, "/0neFFFFFFFF/registrations/rest-scope/register?api-version=2019-03-31", `{}`)
		assert.Equal(t, http.StatusServiceUnavailable, r.status, "another ID scope, as CONNACK 3 over MQTT")
		assert.Equal(t, float64(503000), r.body["errorCode"])
	})
	t.Run("bad requests", func(t *testing.T) {
		c := newREST(t, s, s.Addr(), "rest-bad", factoryCert(t, s, "rest-bad"))
		r := c.do(http.MethodPut, "/"+s.IDScope()+"/registrations/rest-bad/register", `{}`)
		assert.Equal(t, http.StatusBadRequest, r.status, "no api-version")
		assert.Equal(t, float64(400001), r.body["errorCode"])
		r = c.register(`{"registrationId":"someone-else"}`)
		assert.Equal(t, http.StatusBadRequest, r.status)
		assert.Equal(t, float64(400005), r.body["errorCode"])
		r = c.poll("4.0000000000000000.unknown")
		assert.Equal(t, http.StatusNotFound, r.status)
		assert.Equal(t, float64(404201), r.body["errorCode"])

		resp, err := c.http.Do(mustRequest(t, http.MethodGet, "https://"+s.Addr()+"/"+s.IDScope()+"/registrations/rest-bad/register", nil))
		require.NoError(t, err)
		resp.Body.Close()
		assert.Equal(t, http.StatusMethodNotAllowed, resp.StatusCode)
	})
}

func TestRESTLimits(t *testing.T) {
	t.Run("poll limit", func(t *testing.T) {
		s := dpstest.NewServer(t, func(c *dpstest.Config) { c.PollLimit, c.AssignDelay = 2, time.Hour })
		c := newREST(t, s, s.Addr(), "rest-polls", factoryCert(t, s, "rest-polls"))
		opID := c.register(`{}`).body["operationId"].(string)
		for range 2 {
			assert.Equal(t, http.StatusAccepted, c.poll(opID).status)
		}
		r := c.poll(opID)
		assert.Equal(t, http.StatusTooManyRequests, r.status)
		assert.Equal(t, "10", r.header.Get("Retry-After"))
		assert.Equal(t, float64(429002), r.body["errorCode"])
		assert.Equal(t, int64(1), s.Stats().Throttled)
	})
	t.Run("message size", func(t *testing.T) {
		s := dpstest.NewServer(t, func(c *dpstest.Config) { c.MaxMessageSize = 1024 })
		c := newREST(t, s, s.Addr(), "rest-big", factoryCert(t, s, "rest-big"))
		_, err := c.http.Do(mustRequest(t, http.MethodPut, "https://"+s.Addr()+"/"+s.IDScope()+"/registrations/rest-big/register?api-version=2019-03-31",
			bytes.NewReader(bytes.Repeat([]byte(" "), 2048))))
		assert.Error(t, err, "the connection is closed, as over MQTT")
	})
}

func TestRESTFaults(t *testing.T) {
	t.Run("status with retry-after", func(t *testing.T) {
		s := withFault(t, dpstest.Fault{Step: dpstest.StepRegister, Action: dpstest.Status, Status: 503, RetryAfter: 7 * time.Second, Times: 1})
		c := newREST(t, s, s.Addr(), "rest-fault", factoryCert(t, s, "rest-fault"))
		r := c.register(`{}`)
		assert.Equal(t, http.StatusServiceUnavailable, r.status)
		assert.Equal(t, "7", r.header.Get("Retry-After"))
		assert.Equal(t, http.StatusAccepted, c.register(`{}`).status, "once")
	})
	t.Run("drop", func(t *testing.T) {
		s := withFault(t, dpstest.Fault{Step: dpstest.StepRegister, Action: dpstest.Drop, Times: 1})
		c := newREST(t, s, s.Addr(), "rest-drop", factoryCert(t, s, "rest-drop"))
		_, err := c.http.Do(mustRequest(t, http.MethodPut, "https://"+s.Addr()+"/"+s.IDScope()+"/registrations/rest-drop/register?api-version=2019-03-31", nil))
		assert.Error(t, err)
	})
	t.Run("drop after reply", func(t *testing.T) {
		s := withFault(t, dpstest.Fault{Step: dpstest.StepRegister, Action: dpstest.DropAfterReply, Times: 1})
		r := newREST(t, s, s.Addr(), "rest-dar", factoryCert(t, s, "rest-dar")).register(`{}`)
		assert.Equal(t, http.StatusAccepted, r.status)
		assert.True(t, r.connClosed)
	})
	t.Run("malformed", func(t *testing.T) {
		s := withFault(t, dpstest.Fault{Step: dpstest.StepRegister, Action: dpstest.Malformed, Times: 1})
		c := newREST(t, s, s.Addr(), "rest-malformed", factoryCert(t, s, "rest-malformed"))
		resp, err := c.http.Do(mustRequest(t, http.MethodPut, "https://"+s.Addr()+"/"+s.IDScope()+"/registrations/rest-malformed/register?api-version=2019-03-31", nil))
		require.NoError(t, err)
		defer resp.Body.Close()
		data, err := io.ReadAll(resp.Body)
		require.NoError(t, err)
		assert.Equal(t, http.StatusAccepted, resp.StatusCode)
		assert.False(t, json.Valid(data), "%s", data)
	})
	t.Run("delay", func(t *testing.T) {
		s := withFault(t, dpstest.Fault{Step: dpstest.StepRegister, Action: dpstest.Delay, Delay: 300 * time.Millisecond, Times: 1})
		start := time.Now()
		r := newREST(t, s, s.Addr(), "rest-delay", factoryCert(t, s, "rest-delay")).register(`{}`)
		assert.Equal(t, http.StatusAccepted, r.status)
		assert.GreaterOrEqual(t, time.Since(start), 300*time.Millisecond)
	})
	t.Run("websocket refused", func(t *testing.T) {
		s := withFault(t, dpstest.Fault{Step: dpstest.StepWebSocket, Action: dpstest.Status, Status: http.StatusForbidden, Times: 1})
		_, err := dial(t, s, dialOpts{regID: "ws-refused", cert: factoryCert(t, s, "ws-refused"), webSocket: true})
		require.Error(t, err)
		assert.Contains(t, err.Error(), "bad handshake")
		mustDial(t, s, dialOpts{regID: "ws-refused", cert: factoryCert(t, s, "ws-refused"), webSocket: true}) // once
	})
	t.Run("websocket dropped", func(t *testing.T) {
		s := withFault(t, dpstest.Fault{Step: dpstest.StepWebSocket, Action: dpstest.Drop, Times: 1})
		_, err := dial(t, s, dialOpts{regID: "ws-dropped", cert: factoryCert(t, s, "ws-dropped"), webSocket: true})
		require.Error(t, err)
	})
}

// withFault is a server with one fault armed.
func withFault(t *testing.T, f dpstest.Fault) *dpstest.Server {
	return dpstest.NewServer(t, func(c *dpstest.Config) { c.Faults = []dpstest.Fault{f} })
}

func mustRequest(t *testing.T, method, url string, body io.Reader) *http.Request {
	t.Helper()
	req, err := http.NewRequest(method, url, body)
	require.NoError(t, err)
	return req
}
