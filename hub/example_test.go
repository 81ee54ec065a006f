package hub_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log"
	"net"
	"time"

	"github.com/unicity-iot/unicity/hub"
	"github.com/unicity-iot/unicity/hub/hubtest"
	"github.com/unicity-iot/unicity/internal/dial"
	"github.com/unicity-iot/unicity/internal/pki"
)

// exampleHub starts an in-process hub that knows deviceID, and returns it with the roots
// that verify it and a certificate for the device from a throwaway CA. On a device the
// certificate is attest.Identity.TLSCertificate, its key in the TPM.
func exampleHub(deviceID string) (*hubtest.Hub, *x509.CertPool, tls.Certificate) {
	serverCA, err := pki.NewRoot("hub server root")
	if err != nil {
		log.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	emulator, err := hubtest.NewOnListeners(serverCA, l, nil, nil, nil)
	if err != nil {
		log.Fatal(err)
	}
	factoryCA, err := pki.NewRoot("OEM factory CA")
	if err != nil {
		log.Fatal(err)
	}
	if err := emulator.Register(hubtest.Device{ID: deviceID, CAs: []*x509.Certificate{factoryCA.Certificate}}); err != nil {
		log.Fatal(err)
	}
	leaf, err := factoryCA.NewDevice(deviceID)
	if err != nil {
		log.Fatal(err)
	}
	return emulator, serverCA.Pool(), leaf.TLSCertificate()
}

// One session with the hub DPS assigned: Run keeps it up (reconnecting with backoff) while
// Send queues telemetry and waits for the hub's acknowledgement.
func Example() {
	emulator, roots, cert := exampleHub("gw-0001")
	defer emulator.Close()

	c, err := hub.New(hub.Config{
		Hub:      emulator.Name(), // Assignment.AssignedHub from dps
		DeviceID: "gw-0001",       // Assignment.DeviceID
		Dial: dial.Config{
			Transport:   dial.TransportMQTT,
			RootCAs:     roots, // nil for Azure: its roots are built in
			Certificate: &cert,
		},
	})
	if err != nil {
		log.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- c.Run(ctx) }()

	sendCtx, sendCancel := context.WithTimeout(ctx, 30*time.Second)
	err = c.Send(sendCtx, hub.Message{Payload: []byte(`{"temperature":21.5}`), Properties: map[string]string{"kind": "reading"}})
	sendCancel()
	if err != nil {
		log.Fatal(err)
	}
	cancel()
	if err := <-ran; !errors.Is(err, context.Canceled) {
		log.Fatal(err)
	}

	for _, m := range emulator.Telemetry("gw-0001") {
		fmt.Println(string(m.Payload), m.Properties)
	}
	// Output:
	// {"temperature":21.5} map[kind:reading]
}

// When the device is deleted from the hub (or disabled, or moved to another hub), the hub
// closes the session and refuses the next CONNECT: Run returns ErrNotAuthorized instead of
// retrying, and the agent registers with DPS again to learn where the device belongs now.
func Example_deviceDeleted() {
	emulator, roots, cert := exampleHub("gw-0002")
	defer emulator.Close()

	c, err := hub.New(hub.Config{
		Hub:      emulator.Name(),
		DeviceID: "gw-0002",
		Dial:     dial.Config{Transport: dial.TransportMQTT, RootCAs: roots, Certificate: &cert},
		Backoff:  func(int) time.Duration { return 0 }, // reconnect at once, for the example
	})
	if err != nil {
		log.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ran := make(chan error, 1)
	go func() { ran <- c.Run(ctx) }()
	if err := c.AwaitConnection(ctx); err != nil {
		log.Fatal(err)
	}

	if err := emulator.Delete("gw-0002"); err != nil {
		log.Fatal(err)
	}
	err = <-ran
	var refused *hub.ConnectError
	fmt.Println("not authorized:", errors.Is(err, hub.ErrNotAuthorized))
	if errors.As(err, &refused) {
		fmt.Println("CONNACK return code:", refused.ReturnCode)
	}
	// Output:
	// not authorized: true
	// CONNACK return code: 5
}
