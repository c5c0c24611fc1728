"""The production service: master data, orders, bookings, downtime and OEE."""
