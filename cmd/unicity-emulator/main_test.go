package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/eclipse/paho.mqtt.golang/packets"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/internal/pki"
	"github.com/unicity-iot/unicity/sas"
)

// runCLI runs the command in process and returns stdout and the exit code.
func runCLI(t testing.TB, args ...string) (string, int) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	err := run(testContext(t), args, &stdout, &stderr)
	code := report(err, &stderr)
	if code != 0 {
		t.Logf("%v: exit %d: %s", args, code, stderr.String())
	}
	return stdout.String(), code
}

// cliJSON runs a command that must succeed and decodes its output.
func cliJSON(t testing.TB, out any, args ...string) {
	t.Helper()
	stdout, code := runCLI(t, args...)
	require.Equal(t, 0, code, "%v", args)
	require.NoError(t, json.Unmarshal([]byte(stdout), out), stdout)
}

func testContext(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

type serveLine struct {
	Metrics     string   `json:"metrics"`
	IDScope     string   `json:"id_scope"`
	DPS         string   `json:"dps"`
	DPSWS       string   `json:"dps_ws"`
	Hub         string   `json:"hub"`
	Hubs        []string `json:"hubs"`
	HubsWS      []string `json:"hubs_ws"`
	TrustBundle string   `json:"trust_bundle"`
	AdminSocket string   `json:"admin_socket"`
}

// serve runs 'serve' until the test ends and returns the line it printed.
func serve(t testing.TB, dir string, args ...string) serveLine {
	t.Helper()
	line, stop := startServe(t, dir, args...)
	t.Cleanup(stop)
	return line
}

// startServe runs 'serve' until stop is called (once, before the test ends).
func startServe(t testing.TB, dir string, args ...string) (serveLine, func()) {
	t.Helper()
	return startServeTo(t, dir, io.Discard, args...)
}

// startServeTo is startServe with serve's stderr going to stderr.
func startServeTo(t testing.TB, dir string, stderr io.Writer, args ...string) (serveLine, func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	r, w := io.Pipe()
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, append([]string{"serve", "--dir", dir}, args...), w, stderr)
		w.Close()
	}()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			assert.NoError(t, <-done)
			_, err := os.Stat(filepath.Join(dir, adminSocketFile))
			assert.ErrorIs(t, err, os.ErrNotExist, "the admin socket is removed")
		})
	}
	line, err := bufio.NewReader(r).ReadString('\n')
	if err != nil {
		stop()
		t.Fatalf("serve printed no line: %v", err)
	}
	go io.Copy(io.Discard, r)
	var out serveLine
	require.NoError(t, json.Unmarshal([]byte(line), &out), line)
	return out, stop
}

func TestUsageAndExitCodes(t *testing.T) {
	for _, tc := range []struct {
		args []string
		code int
		out  string
	}{
		{nil, 2, ""},
		{[]string{"--help"}, 0, "Commands:"},
		{[]string{"frobnicate"}, 2, ""},
		{[]string{"serve", "--help"}, 0, "--dir DIR"},
		{[]string{"sign", "-h"}, 0, "--csr FILE"},
		{[]string{"init"}, 2, ""},
		{[]string{"devices", "--dir"}, 2, ""},
		{[]string{"init", "--dir", t.TempDir(), "extra"}, 2, ""},
		{[]string{"init", "--dir", t.TempDir(), "--id-scope", "0ne/../x"}, 2, ""},
		{[]string{"serve", "--dir", t.TempDir(), "--quota", "many"}, 2, ""},
		{[]string{"serve", "--dir", t.TempDir(), "--unknown-device", "ignore"}, 2, ""},
		{[]string{"serve", "--dir", t.TempDir(), "--poll-limit", "-1"}, 2, ""},
		{[]string{"serve", "--dir", t.TempDir(), "--hubs", "1", "--hub-addr", "a", "--hub-addr", "b"}, 2, ""},
		{[]string{"serve", "--dir", t.TempDir()}, 1, ""},   // not initialised
		{[]string{"devices", "--dir", t.TempDir()}, 1, ""}, // nothing serving
		{[]string{"c2d", "--dir", t.TempDir()}, 2, ""},
		{[]string{"enroll", "--dir", t.TempDir()}, 2, ""},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			out, code := runCLI(t, tc.args...)
			assert.Equal(t, tc.code, code)
			assert.Contains(t, out, tc.out)
		})
	}
}

func TestParseQuota(t *testing.T) {
	for in, want := range map[string]int{"": 0, "120/min": 120, "7": 7} {
		got, err := parseQuota(in)
		require.NoError(t, err)
		assert.Equal(t, want, got)
	}
	for _, bad := range []string{"0/min", "-1", "5/s", "x/min"} {
		_, err := parseQuota(bad)
		assert.Error(t, err, bad)
	}
}

func TestInitAndSign(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "emu")
	var out map[string]string
	cliJSON(t, &out, "init", "--dir", dir, "--id-scope", "0neTEST")
	assert.Equal(t, "0neTEST", out["id_scope"])
	for _, f := range []string{serverCAKey, factoryCAKey, issuingCAKey, configFile} {
		fi, err := os.Stat(filepath.Join(dir, f))
		require.NoError(t, err)
		assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm(), f)
	}
	fi, err := os.Stat(dir)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o700), fi.Mode().Perm())
	_, code := runCLI(t, "init", "--dir", dir)
	assert.Equal(t, 1, code, "an initialised directory is not overwritten")

	trust, err := certcodec.ReadCertificates(out["trust_bundle"])
	require.NoError(t, err)
	roots := x509.NewCertPool()
	roots.AddCert(trust[0])

	t.Run("valid CSR", func(t *testing.T) {
		csr, _ := writeCSR(t, "gw-0001", "PEM")
		chainFile := filepath.Join(t.TempDir(), "chain.pem")
		var res map[string]string
		cliJSON(t, &res, "sign", "--dir", dir, "--csr", csr, "--out", chainFile)
		assert.Equal(t, "gw-0001", res["registration_id"])
		chain, err := certcodec.ReadCertificates(chainFile)
		require.NoError(t, err)
		require.Len(t, chain, 2, "leaf and factory CA")
		assert.Equal(t, certcodec.Thumbprint(chain[0]), res["sha256_thumbprint"])
		inters := x509.NewCertPool()
		inters.AddCert(chain[1])
		_, err = chain[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inters, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
		assert.NoError(t, err)
	})
	t.Run("DER CSR", func(t *testing.T) {
		csr, _ := writeCSR(t, "gw-0002", "DER")
		_, code := runCLI(t, "sign", "--dir", dir, "--csr", csr, "--out", filepath.Join(t.TempDir(), "c.pem"))
		assert.Equal(t, 0, code)
	})
	for _, cn := range []string{"", "has space", "ends-with.", strings.Repeat("x", 65)} {
		t.Run("CN "+strconv.Quote(cn), func(t *testing.T) {
			csr, _ := writeCSR(t, cn, "PEM")
			out := filepath.Join(t.TempDir(), "c.pem")
			_, code := runCLI(t, "sign", "--dir", dir, "--csr", csr, "--out", out)
			assert.Equal(t, 1, code)
			assert.NoFileExists(t, out)
		})
	}
	t.Run("not a CSR", func(t *testing.T) {
		_, code := runCLI(t, "sign", "--dir", dir, "--csr", out["trust_bundle"], "--out", filepath.Join(t.TempDir(), "c.pem"))
		assert.Equal(t, 1, code)
	})
}

// writeCSR makes a key and a CSR for cn and writes the CSR as PEM or DER.
func writeCSR(t testing.TB, cn, form string) (string, *pki.Leaf) {
	t.Helper()
	key, err := pki.NewKey(pki.ECDSAP256)
	require.NoError(t, err)
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: cn}}, key)
	require.NoError(t, err)
	data := der
	if form == "PEM" {
		data = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
	}
	path := filepath.Join(t.TempDir(), "device.csr")
	require.NoError(t, os.WriteFile(path, data, 0o600))
	return path, &pki.Leaf{Key: key}
}

// device is a device with a certificate signed through the CLI.
type device struct {
	id        string
	cert      tls.Certificate
	chainFile string // leaf and factory CA, PEM
	sasKey    []byte // symmetric-key devices: the device key, and no certificate
}

func newDevice(t testing.TB, dir, id string) device {
	t.Helper()
	csr, leaf := writeCSR(t, id, "PEM")
	chainFile := filepath.Join(t.TempDir(), "chain.pem")
	_, code := runCLI(t, "sign", "--dir", dir, "--csr", csr, "--out", chainFile)
	require.Equal(t, 0, code)
	chain, err := certcodec.ReadCertificates(chainFile)
	require.NoError(t, err)
	leaf.Chain = chain
	return device{id: id, cert: leaf.TLSCertificate(), chainFile: chainFile}
}

func trustPool(t testing.TB, bundle string) *x509.CertPool {
	certs, err := certcodec.ReadCertificates(bundle)
	require.NoError(t, err)
	p := x509.NewCertPool()
	for _, c := range certs {
		p.AddCert(c)
	}
	return p
}

func mqttClient(t testing.TB, broker, clientID, username, serverName string, roots *x509.CertPool, cert tls.Certificate, msgs chan mqtt.Message, lost chan error) (mqtt.Client, error) {
	return mqttClientSAS(t, broker, clientID, username, "", serverName, roots, &cert, msgs, lost)
}

// mqttClientSAS connects with a password and, when cert is not nil, a client certificate.
func mqttClientSAS(t testing.TB, broker, clientID, username, password, serverName string, roots *x509.CertPool, cert *tls.Certificate, msgs chan mqtt.Message, lost chan error) (mqtt.Client, error) {
	tc := &tls.Config{RootCAs: roots, ServerName: serverName, MinVersion: tls.VersionTLS12}
	if cert != nil {
		tc.Certificates = []tls.Certificate{*cert}
	}
	o := mqtt.NewClientOptions().AddBroker(broker).SetClientID(clientID).SetUsername(username).SetTLSConfig(tc).
		SetProtocolVersion(4).SetAutoReconnect(false).SetCleanSession(true).SetOrderMatters(false).
		SetDefaultPublishHandler(func(_ mqtt.Client, m mqtt.Message) { msgs <- m })
	if password != "" {
		o.SetPassword(password)
	}
	if lost != nil {
		o.SetConnectionLostHandler(func(_ mqtt.Client, err error) { lost <- err })
	}
	c := mqtt.NewClient(o)
	tok := c.Connect()
	require.True(t, tok.WaitTimeout(15*time.Second))
	if err := tok.Error(); err != nil {
		return nil, err
	}
	t.Cleanup(func() { c.Disconnect(0) })
	return c, nil
}

// register runs one DPS registration as the SDKs do: subscribe, register, poll while
// assigning. It returns the assigned hub.
func register(t testing.TB, s serveLine, d device) string {
	t.Helper()
	r := registerWith(t, s, d, `{"registrationId":"`+d.id+`"}`)
	require.Equal(t, "assigned", r.Status, "%+v", r)
	assert.Equal(t, d.id, r.RegistrationState.DeviceID)
	return r.RegistrationState.AssignedHub
}

// registration is the last answer of a registration.
type registration struct {
	OperationID       string `json:"operationId"`
	Status            string `json:"status"`
	RegistrationState struct {
		AssignedHub  string          `json:"assignedHub"`
		DeviceID     string          `json:"deviceId"`
		Substatus    string          `json:"substatus"`
		ErrorCode    int             `json:"errorCode"`
		ErrorMessage string          `json:"errorMessage"`
		Payload      json.RawMessage `json:"payload"`
	} `json:"registrationState"`
}

// registerWith registers with this request body and returns the answer that ends it.
func registerWith(t testing.TB, s serveLine, d device, body string) registration {
	t.Helper()
	msgs := make(chan mqtt.Message, 10)
	cert, password := &d.cert, ""
	if d.sasKey != nil {
		cert, password = nil, sas.Token(d.sasKey, s.IDScope+"/registrations/"+d.id, time.Now().Add(time.Hour), "registration")
	}
	c, err := mqttClientSAS(t, "tls://"+s.DPS, d.id, s.IDScope+"/registrations/"+d.id+"/api-version=2019-03-31", password,
		"global.azure-devices-provisioning.net", trustPool(t, s.TrustBundle), cert, msgs, nil)
	require.NoError(t, err)
	defer c.Disconnect(0)
	require.True(t, c.Subscribe("$dps/registrations/res/#", 1, nil).WaitTimeout(10*time.Second))
	c.Publish("$dps/registrations/PUT/iotdps-register/?$rid=1", 1, false, body)
	for rid := 2; ; rid++ {
		m := next(t, msgs)
		var r registration
		require.NoError(t, json.Unmarshal(m.Payload(), &r), "%s %s", m.Topic(), m.Payload())
		if r.Status != "assigning" {
			return r
		}
		c.Publish("$dps/registrations/GET/iotdps-get-operationstatus/?$rid="+strconv.Itoa(rid)+"&operationId="+r.OperationID, 1, false, " ")
	}
}

func connectHub(t testing.TB, s serveLine, hub string, d device, msgs chan mqtt.Message, lost chan error) (mqtt.Client, error) {
	cert, password := &d.cert, ""
	if d.sasKey != nil {
		cert, password = nil, sas.Token(d.sasKey, hub+"/devices/"+d.id, time.Now().Add(time.Hour), "")
	}
	return mqttClientSAS(t, "tls://"+hubAddr(hub), d.id, hub+"/"+d.id+"/?api-version=2021-04-12", password, "localhost",
		trustPool(t, s.TrustBundle), cert, msgs, lost)
}

// hubAddr is the address of a hub by its name: a name without a port is on 8883, as in Azure.
func hubAddr(name string) string {
	if _, _, err := net.SplitHostPort(name); err != nil {
		return net.JoinHostPort(name, "8883")
	}
	return name
}

func next(t testing.TB, msgs chan mqtt.Message) mqtt.Message {
	t.Helper()
	select {
	case m := <-msgs:
		return m
	case <-time.After(15 * time.Second):
		t.Fatal("no message")
		return nil
	}
}

// TestServeEndToEnd provisions a device with a CLI-signed certificate through DPS, connects
// it to its hub and drives every operator command against it.
func TestServeEndToEnd(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "emu")
	_, code := runCLI(t, "init", "--dir", dir)
	require.Equal(t, 0, code)
	s := serve(t, dir, "--hubs", "2", "--retry-after", "0")
	require.Len(t, s.Hubs, 2)
	assert.Equal(t, s.Hubs[0], s.Hub)
	assert.Regexp(t, `^0ne[0-9A-F]{8}$`, s.IDScope)
	_, code = runCLI(t, "serve", "--dir", dir)
	assert.Equal(t, 1, code, "a second emulator on the same directory is refused")

	dev := newDevice(t, dir, "gw-1")
	hub := register(t, s, dev)
	require.Contains(t, s.Hubs, hub)
	other := s.Hubs[0]
	if other == hub {
		other = s.Hubs[1]
	}

	msgs, lost := make(chan mqtt.Message, 10), make(chan error, 1)
	c, err := connectHub(t, s, hub, dev, msgs, lost)
	require.NoError(t, err)
	for _, f := range []string{"devices/gw-1/messages/devicebound/#", "$iothub/methods/POST/#", "$iothub/twin/PATCH/properties/desired/#"} {
		require.True(t, c.Subscribe(f, 1, nil).WaitTimeout(10*time.Second))
	}
	c.Publish("devices/gw-1/messages/events/%24.ct=application%2Fjson&kind=boot", 1, false, `{"temp":21}`)

	var devices []deviceJSON
	cliJSON(t, &devices, "devices", "--dir", dir)
	require.Len(t, devices, 1)
	assert.Equal(t, hub, devices[0].Hub)
	assert.Equal(t, "gw-1", devices[0].ID)
	assert.True(t, devices[0].Connected)

	var tel []telemetryJSON
	cliJSON(t, &tel, "telemetry", "--dir", dir, "--device", "gw-1", "--wait", "1")
	require.Len(t, tel, 1)
	assert.Equal(t, `{"temp":21}`, tel[0].Payload)
	assert.Equal(t, map[string]string{"kind": "boot"}, tel[0].Properties)
	assert.Equal(t, "application/json", tel[0].System["$.ct"])
	_, code = runCLI(t, "telemetry", "--dir", dir, "--device", "gw-1", "--wait", "5", "--timeout", "100ms")
	assert.Equal(t, 1, code, "waiting for more than arrives times out")

	var sent map[string]string
	cliJSON(t, &sent, "c2d", "--dir", dir, "--device", "gw-1", "--payload", "reboot soon", "--property", "prio=high")
	m := next(t, msgs)
	assert.Equal(t, "reboot soon", string(m.Payload()))
	assert.Contains(t, m.Topic(), "prio=high")
	assert.Contains(t, m.Topic(), "%24.mid="+sent["message_id"])

	go func() {
		m := <-msgs
		rid := m.Topic()[strings.Index(m.Topic(), "$rid=")+5:]
		c.Publish("$iothub/methods/res/200/?$rid="+rid, 0, false, `{"uptime":`+string(m.Payload())+`}`)
	}()
	var res struct {
		Status  int             `json:"status"`
		Payload json.RawMessage `json:"payload"`
	}
	cliJSON(t, &res, "invoke", "--dir", dir, "--device", "gw-1", "--method", "uptime", "--payload", `{"unit":"s"}`)
	assert.Equal(t, 200, res.Status)
	assert.JSONEq(t, `{"uptime":{"unit":"s"}}`, string(res.Payload))
	for _, outside := range []string{"4s", "301s"} {
		_, code = runCLI(t, "invoke", "--dir", dir, "--device", "gw-1", "--method", "silent", "--timeout", outside)
		assert.Equal(t, 2, code, "IoT Hub allows 5 s to 300 s, not %s", outside)
	}
	var failed methodErrorJSON
	stdout, code := runCLI(t, "invoke", "--dir", dir, "--device", "gw-1", "--method", "silent", "--timeout", "5s")
	assert.Equal(t, 1, code, "no answer in time")
	require.NoError(t, json.Unmarshal([]byte(stdout), &failed), stdout)
	assert.Equal(t, 504, failed.Status)
	assert.Equal(t, 504101, failed.ErrorCode)
	assert.Equal(t, "Timed out waiting for the response from device.", failed.Message)
	<-msgs

	var twin map[string]map[string]any
	cliJSON(t, &twin, "twin", "--dir", dir, "--device", "gw-1", "--desired", `{"interval":10}`)
	assert.Equal(t, float64(10), twin["desired"]["interval"])
	m = next(t, msgs)
	assert.Equal(t, "$iothub/twin/PATCH/properties/desired/?$version=2", m.Topic())
	cliJSON(t, &twin, "twin", "--dir", dir, "--device", "gw-1")
	assert.Equal(t, float64(2), twin["desired"]["$version"])

	// Move: the device is dropped, refused by its old hub, and DPS sends it to the new one.
	var moved deviceJSON
	cliJSON(t, &moved, "move", "--dir", dir, "--device", "gw-1", "--hub", other)
	assert.Equal(t, other, moved.Hub)
	<-lost
	_, err = connectHub(t, s, hub, dev, msgs, nil)
	assert.ErrorIs(t, err, packets.ErrorRefusedNotAuthorised)
	var refusals []refusalJSON
	cliJSON(t, &refusals, "devices", "--dir", dir, "--refused")
	require.Len(t, refusals, 1)
	assert.Equal(t, hub, refusals[0].Hub)
	assert.Contains(t, refusals[0].Reason, "not registered on this hub")
	require.Equal(t, other, register(t, s, dev), "re-registration follows the move")
	_, err = connectHub(t, s, other, dev, msgs, lost)
	require.NoError(t, err)
	cliJSON(t, &twin, "twin", "--dir", dir, "--device", "gw-1")
	assert.Equal(t, float64(10), twin["desired"]["interval"], "the twin moved along")

	var info deviceJSON
	cliJSON(t, &info, "disable", "--dir", dir, "--device", "gw-1")
	assert.Equal(t, "disabled", info.Status)
	<-lost
	_, err = connectHub(t, s, other, dev, msgs, nil)
	assert.ErrorIs(t, err, packets.ErrorRefusedNotAuthorised)
	// Registering again does not enable it: DPS assigns it, its hub still refuses it.
	assert.Equal(t, other, register(t, s, dev))
	_, err = connectHub(t, s, other, dev, msgs, nil)
	assert.ErrorIs(t, err, packets.ErrorRefusedNotAuthorised, "disabled through re-provisioning")
	stdout, code = runCLI(t, "invoke", "--dir", dir, "--device", "gw-1", "--method", "uptime")
	assert.Equal(t, 1, code, "the device is offline")
	require.NoError(t, json.Unmarshal([]byte(stdout), &failed), stdout)
	assert.Equal(t, methodErrorJSON{Status: 404, ErrorCode: 404103, Message: "Timed out waiting for device to connect.", Error: failed.Error}, failed)
	cliJSON(t, &info, "disable", "--dir", dir, "--device", "gw-1", "--enable")
	assert.Equal(t, "enabled", info.Status)

	for _, args := range [][]string{
		{"twin", "--device", "gw-1", "--desired", `{"bad.name":1}`}, // IoT Hub's property-name rules
		{"twin", "--device", "gw-1", "--desired", `[1]`},
		{"move", "--device", "gw-1", "--hub", "nowhere:1"},
		{"disable", "--device", "nobody"},
		{"invoke", "--device", "nobody", "--method", "m"},
		{"c2d", "--device", "gw-1", "--payload", strings.Repeat("x", 65<<10)},
	} {
		_, code = runCLI(t, append([]string{args[0], "--dir", dir}, args[1:]...)...)
		assert.Equal(t, 1, code, "%v", args)
	}

	var del map[string]string
	cliJSON(t, &del, "delete", "--dir", dir, "--device", "gw-1")
	assert.Equal(t, other, del["deleted_from"])
	_, code = runCLI(t, "delete", "--dir", dir, "--device", "gw-1")
	assert.Equal(t, 1, code)
	_, code = runCLI(t, "twin", "--dir", dir, "--device", "gw-1")
	assert.Equal(t, 1, code)
}

// TestEnroll adds an individual enrollment for a certificate from a foreign CA, which the
// factory group does not admit.
func TestEnroll(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "emu")
	_, code := runCLI(t, "init", "--dir", dir)
	require.Equal(t, 0, code)
	first, stop := startServe(t, dir, "--retry-after", "0")
	s := first

	foreign, err := pki.NewRoot("foreign")
	require.NoError(t, err)
	leaf, err := foreign.NewDevice("outsider")
	require.NoError(t, err)
	certFile := filepath.Join(t.TempDir(), "outsider.pem")
	require.NoError(t, certcodec.WriteCertificates(certFile, leaf.Certificate()))
	dev := device{id: "outsider", cert: leaf.TLSCertificate()}

	msgs := make(chan mqtt.Message, 1)
	_, err = mqttClient(t, "tls://"+s.DPS, dev.id, s.IDScope+"/registrations/outsider/api-version=2019-03-31",
		"localhost", trustPool(t, s.TrustBundle), dev.cert, msgs, nil)
	assert.ErrorIs(t, err, packets.ErrorRefusedNotAuthorised, "not enrolled yet")

	var out map[string]any
	cliJSON(t, &out, "enroll", "--dir", dir, "--registration-id", "outsider", "--cert", certFile,
		"--initial-twin", `{"properties":{"desired":{"site":"lab"}}}`)
	assert.Equal(t, s.Hub, register(t, s, dev))
	var twin map[string]map[string]any
	cliJSON(t, &twin, "twin", "--dir", dir, "--device", "outsider")
	assert.Equal(t, "lab", twin["desired"]["site"])
	fi, err := os.Stat(filepath.Join(dir, enrollmentsFile))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())

	caFile := filepath.Join(t.TempDir(), "ca.pem")
	require.NoError(t, certcodec.WriteCertificates(caFile, foreign.Certificate))
	cliJSON(t, &out, "enroll", "--dir", dir, "--group", "foreign", "--ca", caFile)
	second, err := foreign.NewDevice("outsider-2")
	require.NoError(t, err)
	assert.Equal(t, s.Hub, register(t, s, device{id: "outsider-2", cert: second.TLSCertificate()}))

	_, code = runCLI(t, "enroll", "--dir", dir, "--group", "g", "--registration-id", "r")
	assert.Equal(t, 2, code)
	_, code = runCLI(t, "enroll", "--dir", dir, "--group", "nothing")
	assert.Equal(t, 1, code, "a group needs a CA or a key")

	// Enrollments survive a restart; registrations do not, so the device registers again.
	cliJSON(t, &out, "enroll", "--dir", dir, "--registration-id", "OUTSIDER", "--cert", certFile)
	stop()
	s = serve(t, dir, "--retry-after", "0")
	assert.Equal(t, s.Hub, register(t, s, dev))
	assert.Equal(t, s.Hub, register(t, s, device{id: "outsider-2", cert: second.TLSCertificate()}))
	doc, err := loadEnrollments(filepath.Join(dir, enrollmentsFile))
	require.NoError(t, err)
	assert.Len(t, doc.list, 2, "re-enrolling the same registration ID replaces it")
}

func TestUnknownDeviceGets401(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "emu")
	_, code := runCLI(t, "init", "--dir", dir)
	require.Equal(t, 0, code)
	s := serve(t, dir, "--unknown-device", "401")
	stranger, err := pki.NewRoot("stranger")
	require.NoError(t, err)
	leaf, err := stranger.NewDevice("nobody")
	require.NoError(t, err)

	msgs := make(chan mqtt.Message, 1)
	c, err := mqttClient(t, "tls://"+s.DPS, "nobody", s.IDScope+"/registrations/nobody/api-version=2019-03-31",
		"localhost", trustPool(t, s.TrustBundle), leaf.TLSCertificate(), msgs, nil)
	require.NoError(t, err, "the connection is accepted; the request is refused")
	require.True(t, c.Subscribe("$dps/registrations/res/#", 1, nil).WaitTimeout(10*time.Second))
	c.Publish("$dps/registrations/PUT/iotdps-register/?$rid=7", 1, false, `{"registrationId":"nobody"}`)
	m := next(t, msgs)
	assert.Equal(t, "$dps/registrations/res/401/?$rid=7", m.Topic())
}

// TestServeHubHost checks that --hub-host names the hubs for devices on a LAN and that both
// services present certificates valid for it.
func TestServeHubHost(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "emu")
	_, code := runCLI(t, "init", "--dir", dir)
	require.Equal(t, 0, code)
	s := serve(t, dir, "--hub-host", "emulator.test")
	require.True(t, strings.HasPrefix(s.Hub, "emulator.test:"), s.Hub)
	hubPort := s.Hub[strings.LastIndex(s.Hub, ":")+1:]
	for _, addr := range []string{"127.0.0.1:" + hubPort, s.DPS} {
		conn, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: trustPool(t, s.TrustBundle), ServerName: "emulator.test"})
		require.NoError(t, err, addr)
		conn.Close()
	}
}

// TestSymmetricKeyGroup enrolls a symmetric-key group: a device signs its SAS token with the
// key derived from the group key, is assigned, and the hub accepts the same device key.
func TestSymmetricKeyGroup(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "emu")
	_, code := runCLI(t, "init", "--dir", dir)
	require.Equal(t, 0, code)
	s := serve(t, dir, "--retry-after", "0")
	groupKey := []byte("0123456789abcdef0123456789abcdef")
	var out map[string]any
	cliJSON(t, &out, "enroll", "--dir", dir, "--group", "sas-fleet", "--symmetric-key", base64.StdEncoding.EncodeToString(groupKey))

	dev := device{id: "sas-7", sasKey: sas.DeviceKey(groupKey, "sas-7")}
	hub := register(t, s, dev)
	msgs := make(chan mqtt.Message, 1)
	c, err := connectHub(t, s, hub, dev, msgs, nil)
	require.NoError(t, err)
	c.Publish("devices/sas-7/messages/events/", 1, false, "by key").WaitTimeout(10 * time.Second)
	var tel []telemetryJSON
	cliJSON(t, &tel, "telemetry", "--dir", dir, "--device", "sas-7", "--wait", "1")
	assert.Equal(t, "by key", tel[0].Payload)
	var devices []deviceJSON
	cliJSON(t, &devices, "devices", "--dir", dir)
	require.Len(t, devices, 1)
	assert.Equal(t, []string{"sas"}, devices[0].Auth)

	wrong := device{id: "sas-8", sasKey: []byte("not derived from the group key")}
	_, err = mqttClientSAS(t, "tls://"+s.DPS, wrong.id, s.IDScope+"/registrations/sas-8/api-version=2019-03-31",
		sas.Token(wrong.sasKey, s.IDScope+"/registrations/sas-8", time.Now().Add(time.Hour), "registration"),
		"localhost", trustPool(t, s.TrustBundle), nil, msgs, nil)
	assert.ErrorIs(t, err, packets.ErrorRefusedNotAuthorised)
}

func TestCorruptEnrollmentsRefused(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "emu")
	_, code := runCLI(t, "init", "--dir", dir)
	require.Equal(t, 0, code)
	require.NoError(t, os.WriteFile(filepath.Join(dir, enrollmentsFile), []byte(`{"version":1,"enrollments":[{"group":"g"}]}`), 0o600))
	var stderr bytes.Buffer
	err := run(testContext(t), []string{"serve", "--dir", dir}, io.Discard, &stderr)
	assert.ErrorContains(t, err, enrollmentsFile, "a group with neither CA nor key")
	require.NoError(t, os.WriteFile(filepath.Join(dir, enrollmentsFile), []byte(`{"version":2}`), 0o600))
	err = run(testContext(t), []string{"serve", "--dir", dir}, io.Discard, &stderr)
	assert.ErrorContains(t, err, "unsupported version")
}
