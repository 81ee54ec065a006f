package dpstest_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/dps/dpstest"
)

var errHubDown = errors.New("hub is down")

// provisionAs connects a factory device, provisions it and disconnects.
func provisionAs(t *testing.T, s *dpstest.Server, regID string) response {
	t.Helper()
	d := mustDial(t, s, dialOpts{regID: regID, cert: factoryCert(t, s, regID)})
	defer d.client.Disconnect(0)
	return d.provision(regID)
}

func setFactoryPolicy(t *testing.T, s *dpstest.Server, p dpstest.Policy) {
	t.Helper()
	require.NoError(t, s.AddGroup(dpstest.Group{ID: "factory", CA: s.FactoryCA().Certificate, Policy: p}))
}

func TestAllocation(t *testing.T) {
	hubs := []string{"h0.azure-devices.net", "h1.azure-devices.net", "h2.azure-devices.net"}

	t.Run("hashed spreads devices and is stable", func(t *testing.T) {
		s := dpstest.NewServer(t, fast, func(c *dpstest.Config) { c.Hubs = hubs })
		seen := map[string]string{}
		for i := range 12 {
			id := fmt.Sprintf("spread-%d", i)
			r := provisionAs(t, s, id)
			require.Equal(t, "assigned", r.body.Status)
			seen[id] = r.body.RegistrationState.AssignedHub
		}
		count := map[string]int{}
		for _, h := range seen {
			count[h]++
		}
		assert.Len(t, count, 3, "every hub gets devices: %v", count)
		assert.Equal(t, seen["spread-3"], provisionAs(t, s, "spread-3").body.RegistrationState.AssignedHub)
	})

	t.Run("static", func(t *testing.T) {
		s := dpstest.NewServer(t, fast)
		setFactoryPolicy(t, s, dpstest.Policy{Hubs: hubs[1:], Allocation: dpstest.Static})
		for i := range 4 {
			assert.Equal(t, hubs[1], provisionAs(t, s, fmt.Sprintf("static-%d", i)).body.RegistrationState.AssignedHub)
		}
	})

	t.Run("custom", func(t *testing.T) {
		reg := &assignments{}
		s := dpstest.NewServer(t, fast, func(c *dpstest.Config) { c.Hubs = hubs; c.Registrar = reg })
		var got dpstest.AllocationRequest
		setFactoryPolicy(t, s, dpstest.Policy{
			InitialTwin: json.RawMessage(`{"tags":{"from":"enrollment"}}`),
			Allocate: func(r dpstest.AllocationRequest) (dpstest.AllocationResult, error) {
				got = r
				var p struct{ Site string }
				if err := json.Unmarshal(r.Payload, &p); err != nil {
					return dpstest.AllocationResult{}, err
				}
				return dpstest.AllocationResult{Hub: "h2.azure-devices.net", Payload: json.RawMessage(`{"site":"` + p.Site + `","ok":true}`),
					InitialTwin: json.RawMessage(`{"tags":{"site":"` + p.Site + `"}}`)}, nil
			}})
		d := mustDial(t, s, dialOpts{regID: "custom-1", cert: factoryCert(t, s, "custom-1")})
		d.publish(registerTopic+"1", 1, `{"registrationId":"custom-1","payload":{"site":"plant-9"}}`)
		r := d.next()
		r = d.poll(r.body.OperationID)
		require.Equal(t, "assigned", r.body.Status, "%s", r.raw)
		assert.Equal(t, "h2.azure-devices.net", r.body.RegistrationState.AssignedHub)
		assert.JSONEq(t, `{"site":"plant-9","ok":true}`, string(r.body.RegistrationState.Payload))
		assert.Equal(t, dpstest.AllocationRequest{RegistrationID: "custom-1", EnrollmentID: "factory", Attestation: "x509",
			DeviceID: "custom-1", Payload: json.RawMessage(`{"site":"plant-9"}`), LinkedHubs: hubs}, got)
		assert.JSONEq(t, `{"tags":{"site":"plant-9"}}`, string(reg.last(t).InitialTwin))

		// payload null reaches the hook as no payload, and its error fails the registration.
		d.publish(registerTopic+"2", 1, `{"registrationId":"custom-1","payload":null}`)
		r = d.poll(d.next().body.OperationID)
		assert.Nil(t, got.Payload)
		assert.Equal(t, "h2.azure-devices.net", got.CurrentHub)
		assert.Equal(t, "custom-1", got.CurrentDeviceID)
		assert.Equal(t, 200, r.status)
		assert.Equal(t, "failed", r.body.Status)
		assert.Equal(t, 400207, r.body.RegistrationState.ErrorCode)
		assert.Contains(t, r.body.RegistrationState.ErrorMessage, "Custom allocation failed")
		assert.Empty(t, r.body.RegistrationState.AssignedHub)
		rec, _ := s.Registration("custom-1")
		assert.Equal(t, "failed", rec.Status)
	})

	failures := []struct {
		name   string
		cfg    func(*dpstest.Config)
		policy dpstest.Policy
		code   int
	}{
		{"custom hub not linked", nil, dpstest.Policy{Allocate: func(dpstest.AllocationRequest) (dpstest.AllocationResult, error) {
			return dpstest.AllocationResult{Hub: "rogue.azure-devices.net"}, nil
		}}, 400207},
		{"no linked hub", func(c *dpstest.Config) { c.Hubs = nil }, dpstest.Policy{}, 400208},
		{"hub refuses the device", func(c *dpstest.Config) {
			c.Registrar = dpstest.RegistrarFunc(func(dpstest.Assignment) error { return errHubDown })
		}, dpstest.Policy{}, 400209},
	}
	for _, tc := range failures {
		t.Run(tc.name, func(t *testing.T) {
			opts := []func(*dpstest.Config){fast}
			if tc.cfg != nil {
				opts = append(opts, tc.cfg)
			}
			s := dpstest.NewServer(t, opts...)
			setFactoryPolicy(t, s, tc.policy)
			r := provisionAs(t, s, "failing")
			assert.Equal(t, 200, r.status)
			assert.Equal(t, "failed", r.body.Status)
			st := r.body.RegistrationState
			assert.Equal(t, tc.code, st.ErrorCode)
			assert.NotEmpty(t, st.ErrorMessage)
			if tc.code == 400209 {
				assert.Contains(t, st.ErrorMessage, errHubDown.Error())
			}
			assert.Regexp(t, timeRE, st.CreatedDateTimeUTC)
			assert.Regexp(t, timeRE, st.LastUpdatedDateTimeUTC)
			assert.NotEmpty(t, st.ETag)
			assert.Equal(t, int64(0), s.Stats().Assignments)
		})
	}
}

func TestReprovision(t *testing.T) {
	const a, b, c = "a.azure-devices.net", "b.azure-devices.net", "c.azure-devices.net"
	twin := json.RawMessage(`{"properties":{"desired":{"interval":30}}}`)
	type step struct {
		hubs                  []string // the enrollment's linked hubs for this registration
		hub, substatus, prior string
		twin                  json.RawMessage
	}
	for _, tc := range []struct {
		name   string
		policy dpstest.Reprovision
		steps  []step
	}{
		{"migrate", dpstest.Migrate, []step{
			{[]string{a}, a, "initialAssignment", "", twin},
			{[]string{a}, a, "initialAssignment", "", nil},
			{[]string{b}, b, "deviceDataMigrated", a, nil},
			{[]string{c}, c, "deviceDataMigrated", b, nil},
			{[]string{a}, a, "reprovisionedToInitialAssignment", c, nil},
		}},
		{"reset", dpstest.Reset, []step{
			{[]string{a}, a, "initialAssignment", "", twin},
			{[]string{b}, b, "deviceDataReset", a, twin},
			{[]string{a}, a, "reprovisionedToInitialAssignment", b, twin},
		}},
		{"never", dpstest.Never, []step{
			{[]string{a}, a, "initialAssignment", "", twin},
			{[]string{b}, a, "initialAssignment", "", nil},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			reg := &assignments{}
			now := newClock()
			s := dpstest.NewServer(t, fast, func(c *dpstest.Config) { c.Registrar = reg; c.Now = now.Now })
			var created, etag, updated string
			for i, st := range tc.steps {
				setFactoryPolicy(t, s, dpstest.Policy{Hubs: st.hubs, Allocation: dpstest.Static, Reprovision: tc.policy, InitialTwin: twin})
				r := provisionAs(t, s, "roamer")
				require.Equal(t, "assigned", r.body.Status, "step %d: %s", i, r.raw)
				rs := r.body.RegistrationState
				assert.Equal(t, st.hub, rs.AssignedHub, "step %d", i)
				assert.Equal(t, st.substatus, rs.Substatus, "step %d", i)
				got := reg.last(t)
				assert.Equal(t, st.prior, got.PreviousHub, "step %d", i)
				assert.Equal(t, string(st.twin), string(got.InitialTwin), "step %d", i)
				if i == 0 {
					created = rs.CreatedDateTimeUTC
				} else {
					assert.Equal(t, created, rs.CreatedDateTimeUTC, "created stays")
					assert.NotEqual(t, updated, rs.LastUpdatedDateTimeUTC, "updated moves")
					assert.NotEqual(t, etag, rs.ETag)
				}
				etag, updated = rs.ETag, rs.LastUpdatedDateTimeUTC
				now.Advance(time.Second)
			}
		})
	}

	t.Run("deleted registration starts over", func(t *testing.T) {
		reg := &assignments{}
		s := dpstest.NewServer(t, fast, func(c *dpstest.Config) { c.Registrar = reg })
		setFactoryPolicy(t, s, dpstest.Policy{Hubs: []string{a}})
		provisionAs(t, s, "fresh")
		require.NoError(t, s.DeleteRegistration("FRESH"))
		_, ok := s.Registration("fresh")
		assert.False(t, ok)
		setFactoryPolicy(t, s, dpstest.Policy{Hubs: []string{b}})
		r := provisionAs(t, s, "fresh")
		assert.Equal(t, "initialAssignment", r.body.RegistrationState.Substatus)
		assert.Empty(t, reg.last(t).PreviousHub)
	})
}
