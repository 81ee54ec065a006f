package hubtest_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"

	"github.com/unicity-iot/unicity/hub/hubtest"
)

// benchFixture is newFixture for benchmarks.
func benchFixture(b *testing.B, devices int) (*hubtest.Server, []tls.Certificate) {
	srv := hubtest.NewServer(b)
	factory, err := srv.CA.NewIntermediate("factory CA")
	if err != nil {
		b.Fatal(err)
	}
	certs := make([]tls.Certificate, devices)
	for i := range certs {
		id := fmt.Sprintf("dev-%d", i)
		leaf, err := factory.NewDevice(id)
		if err != nil {
			b.Fatal(err)
		}
		certs[i] = leaf.TLSCertificate()
		if err := srv.Register(hubtest.Device{ID: id, CAs: []*x509.Certificate{factory.Certificate}}); err != nil {
			b.Fatal(err)
		}
	}
	return srv, certs
}

func benchClient(b *testing.B, srv *hubtest.Server, id string, cert tls.Certificate) mqtt.Client {
	o := mqtt.NewClientOptions().AddBroker("tls://" + srv.Addr).SetClientID(id).
		SetUsername(srv.Name() + "/" + id + "/?api-version=2021-04-12").SetProtocolVersion(4).
		SetTLSConfig(&tls.Config{RootCAs: srv.RootCAs(), ServerName: "localhost", Certificates: []tls.Certificate{cert}}).
		SetAutoReconnect(false).SetCleanSession(true)
	c := mqtt.NewClient(o)
	if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		b.Fatalf("connect %s: %v", id, tok.Error())
	}
	return c
}

// BenchmarkConnect measures a device connection: TCP, TLS 1.3 with a client certificate,
// chain verification against the enrolled CA and CONNECT/CONNACK, then DISCONNECT.
func BenchmarkConnect(b *testing.B) {
	srv, certs := benchFixture(b, 1)
	b.ResetTimer()
	for b.Loop() {
		benchClient(b, srv, "dev-0", certs[0]).Disconnect(0)
	}
	b.StopTimer()
	b.ReportMetric(float64(srv.Stats().Connections)/b.Elapsed().Seconds(), "connects/s")
}

// BenchmarkTelemetry measures QoS 1 device-to-cloud messages from 10 devices at once, each
// acknowledged only once recorded.
func BenchmarkTelemetry(b *testing.B) {
	const devices = 10
	srv, certs := benchFixture(b, devices)
	clients := make([]mqtt.Client, devices)
	for i := range clients {
		clients[i] = benchClient(b, srv, fmt.Sprintf("dev-%d", i), certs[i])
		defer clients[i].Disconnect(0)
	}
	payload := []byte(`{"temperature":21.5,"humidity":40}`)
	b.ResetTimer()
	i := 0
	for b.Loop() {
		c := clients[i%devices]
		tok := c.Publish(fmt.Sprintf("devices/dev-%d/messages/events/%%24.ct=application%%2Fjson", i%devices), 1, false, payload)
		if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			b.Fatal(tok.Error())
		}
		i++
	}
	b.StopTimer()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := srv.WaitTelemetry(ctx, "", min(i, 10000)); err != nil {
		b.Fatal(err)
	}
}
