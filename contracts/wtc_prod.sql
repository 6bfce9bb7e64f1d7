-- wtc_prod: the CRM's production tables, exactly as the source data contract describes them.
create schema if not exists crm_system;

create table if not exists crm_system.accounts (
    account_id integer primary key,
    owner_name varchar(100),
    email varchar(100),
    phone_number varchar(100),
    modified_ts timestamp
);

create table if not exists crm_system.addresses (
    account_id integer primary key,
    street_address varchar(100),
    city varchar(100),
    state varchar(100),
    postal_code varchar(100),
    country varchar(100),
    modified_ts timestamp
);

create table if not exists crm_system.devices (
    device_id integer primary key,
    account_id integer,
    device_name varchar(100),
    device_type varchar(100),
    device_os varchar(100),
    modified_ts timestamp
);
