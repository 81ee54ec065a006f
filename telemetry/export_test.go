package telemetry

// QueueFullRetry is how long Forward sleeps on a hub queue full of others' messages.
const QueueFullRetry = queueFullRetry
