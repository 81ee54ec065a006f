package dpstest_test

import (
	"crypto/tls"
	"regexp"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/unicity-iot/unicity/dps/dpstest"
	"github.com/unicity-iot/unicity/internal/certcodec"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

var (
	opIDRE = regexp.MustCompile(`^4\.[0-9a-f]{16}\.[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)
	timeRE = regexp.MustCompile(`^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{7}Z$`)
)

// factoryCert issues a device certificate from the server's factory CA.
func factoryCert(t testing.TB, s *dpstest.Server, cn string) *tls.Certificate {
	t.Helper()
	leaf, err := s.FactoryCA().NewDevice(cn)
	require.NoError(t, err)
	tc := leaf.TLSCertificate()
	return &tc
}

func TestHappyPath(t *testing.T) {
	for _, ws := range []bool{false, true} {
		name := "mqtt"
		if ws {
			name = "websocket"
		}
		t.Run(name, func(t *testing.T) {
			reg := &assignments{}
			s := dpstest.NewServer(t, func(c *dpstest.Config) { c.Registrar = reg })
			cert := factoryCert(t, s, "dev-1")
			d := mustDial(t, s, dialOpts{regID: "dev-1", cert: cert, webSocket: ws, subQoS: 1})

			r := d.register("dev-1")
			assert.Equal(t, 202, r.status)
			assert.Equal(t, "$dps/registrations/res/202/?$rid=1&retry-after=3", r.topic)
			assert.Equal(t, byte(1), r.qos)
			assert.Regexp(t, opIDRE, r.body.OperationID)
			assert.Equal(t, "assigning", r.body.Status)
			assert.JSONEq(t, `{"operationId":"`+r.body.OperationID+`","status":"assigning"}`, string(r.raw))

			r = d.poll(r.body.OperationID)
			require.Equal(t, 200, r.status, "%s", r.raw)
			assert.Equal(t, "$dps/registrations/res/200/?$rid=2", r.topic, "no retry-after on 200")
			assert.Equal(t, "assigned", r.body.Status)
			st := r.body.RegistrationState
			require.NotNil(t, st)
			assert.Equal(t, "dev-1", st.RegistrationID)
			assert.Equal(t, dpstest.DefaultHub, st.AssignedHub)
			assert.Equal(t, "dev-1", st.DeviceID)
			assert.Equal(t, "assigned", st.Status)
			assert.Equal(t, "initialAssignment", st.Substatus)
			assert.Regexp(t, timeRE, st.CreatedDateTimeUTC)
			assert.Regexp(t, timeRE, st.LastUpdatedDateTimeUTC)
			assert.NotEmpty(t, st.ETag)
			assert.NotNil(t, st.X509, "x509 {} present")
			assert.Nil(t, st.Payload)

			a := reg.last(t)
			assert.Equal(t, dpstest.Assignment{RegistrationID: "dev-1", DeviceID: "dev-1", Hub: dpstest.DefaultHub,
				Substatus: "initialAssignment", Auth: dpstest.DeviceAuth{
					Thumbprint: certcodec.Thumbprint(cert.Leaf), CA: s.FactoryCA().Certificate}}, a)

			rec, ok := s.Registration("DEV-1")
			require.True(t, ok, "registration IDs are case-insensitive")
			assert.Equal(t, "assigned", rec.Status)
			assert.Equal(t, []string{dpstest.DefaultHub}, rec.Hubs)
			assert.Equal(t, dpstest.Stats{Connections: 1, Registrations: 1, Polls: 1, Assignments: 1}, s.Stats())
		})
	}
}
